"""Run configs (ml_collections): ``default`` and one file per experiment; see ``jaxdiff.training.get_config``."""
