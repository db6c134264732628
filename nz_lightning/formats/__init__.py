"""File formats: the NZSF container (``nzsf``), whole-model files (``model_file``), atomic writes (``atomic``) and
pickle-free checkpoint reads (``safe_load``)."""
