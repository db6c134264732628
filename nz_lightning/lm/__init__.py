"""The language-model application: LightningModules (``modules``, ``lora``, ``optimizer_config``), data (``data``),
evaluation and its baselines (``evaluate``, ``baselines``), and the run behind ``train.py`` (``run``, summaries
``report``, RSS probes ``memory``)."""
