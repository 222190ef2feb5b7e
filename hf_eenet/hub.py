"""What `import hf_eenet` adds to every EENet model's `save_pretrained` / `from_pretrained` / `push_to_hub`:
the generated model card, the remote-code export and uploads with both (installed as
`EarlyExitMixin.hub_integration`)."""

from .model_card import load_card_data, push_to_hub, save_pretrained

__all__ = ["load_card_data", "push_to_hub", "save_pretrained"]
