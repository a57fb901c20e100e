"""The shared data layer: normalizers into one record schema, blends with per-stage splits, and one
LightningDataModule per stage. ``sources``, ``blend``, ``collate`` and ``synthetic`` import no lightning;
the DataModules are loaded lazily so importing the normalizers stays light."""

from datamodules import sources, synthetic, verifiable  # noqa: F401  (registers the sources)
from datamodules.blend import Blend, SourceSpec

_LAZY = {"SFTDataModule", "PreferenceDataModule", "PromptDataModule", "StageDataModule"}
__all__ = ["Blend", "SourceSpec", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from datamodules import stage

        return getattr(stage, name)
    raise AttributeError(name)
