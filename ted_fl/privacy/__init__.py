"""Privacy studies: policies on what travels (policies.py) and measured leakage (mia.py).

Plain PyTorch and numpy: nothing here imports Flower or Ray; the Flower layer and the
in-process executor call into it, so both apply the same policies.
"""
