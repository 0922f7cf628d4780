"""Everything privacy below the Flower layer: every rule of [privacy] (checks.py, run once per
experiment by `ted_fl.schedule.experiment.resolve`), DP-SGD and the accountant (mechanisms.py), policies on
what travels (policies.py), the leak check of the message audit (leakage.py) and measured leakage
(mia.py, the membership-inference attack).

Plain PyTorch, Opacus and numpy: nothing here imports Flower or Ray; the Flower layer (which adds
client-level DP with Flower's own pieces, `ted_fl.federated.dp`) and the in-process executor call
into it, so both apply the same policies. It sits in the core layer beside `ted_fl.continual`:
training calls DP-SGD, and the attack forwards as evaluation does.
"""
