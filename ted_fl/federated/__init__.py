"""The Flower layer: a ServerApp with the arrival schedule and a thin ClientApp, on the Ray backend."""
