"""The tensor layer: compressed parameters (``parameter``), their decode workspace (``workspace``), whole-model
conversion (``convert``) and the weight-size accounting (``sizes``). Needs torch and the codec, not Lightning."""
