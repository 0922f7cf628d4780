"""Many runs: sweeps (grids of independent cells) and the privacy-utility study built on them.
"""
