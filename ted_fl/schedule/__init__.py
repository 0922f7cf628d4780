"""The arrival schedule and what runs it without Flower: the engine (which site trains when), the
site worker (what a site does to a model), the in-process executor, cells run side by side, and a
run's life (start, progress, finish). `ted_fl.federated` runs the same schedule over Flower.
"""
