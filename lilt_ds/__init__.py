"""lilt_ds: DeepSpeed-backed contrastive training of vision-language dual encoders (CLIP, LiT, LilT)."""

__version__ = "0.1.0"


def build_model(cfg):
    """Build a DualEncoder from an experiment config (see lilt_ds.models.build_model)."""
    from .models import build_model as _build

    return _build(cfg)


def load_exported(path):
    """Rebuild a trained DualEncoder from its base towers and an exported weights file."""
    from .export import load_exported as _load

    return _load(path)
