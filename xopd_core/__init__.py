"""xopd_core: the X-OPD library (config, data, models, losses, engines, trainer, evaluation).

Pure library code: it never imports prefect or dvc (those live in flows/ and tasks/).
"""

__version__ = "0.1.0"
