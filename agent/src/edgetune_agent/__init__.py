"""edgetune's edge agent: serve a frozen base model over the Open Inference Protocol and hot-swap
verified LoRA adapters as the pod's assignment changes. Run as ``python -m edgetune_agent``."""
