"""The language-model application: LightningModules (``modules``, ``lora``, ``optimizer_config``), data (``data``),
evaluation and its baselines (``evaluate``, ``baselines``) and the run logic behind ``train.py`` (``run``)."""
