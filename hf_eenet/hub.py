"""What `import hf_eenet` adds to every EENet model's `save_pretrained` / `from_pretrained` / `push_to_hub`:
the generated model card and the optional remote-code export (installed as `EarlyExitMixin.hub_integration`)."""

from .model_card import load_card_data, push_to_hub, write_model_card
from .remote_code import save_remote_code

__all__ = ["load_card_data", "push_to_hub", "save_remote_code", "write_model_card"]
