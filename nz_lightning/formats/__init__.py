"""File formats: the NZSF container (``nzsf``), whole-model files (``model_file``) and atomic writes (``atomic``)."""
