"""Scale-out: sweeps, searches and fleets run on one engine (Ray, or in-process).

    engine.py   Engine: a local Ray instance, a Ray cluster (`--address`), or this process
    table.py    a results table written as runs finish: Parquet parts, resume, Parquet + CSV
    plot.py     Pareto fronts and their plots, with one marker per policy and one colour per device
    search.py   multi-objective policy search (Optuna NSGA-II)
    fleet.py    federated fine-tuning over a fleet of simulated phones

docs/scale.md describes them.
"""
