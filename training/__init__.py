"""emomerge.training: VLM families, tiny offline models, dataset readers, curriculum training.

Entry points: :func:`train_curriculum` (stage adapters with lineage), :mod:`.data`
(``read_dataset``), :mod:`.families` (``FAMILIES``, ``detect_family``), :mod:`.models`
(``load_vlm``), :mod:`.tiny` (``build_tiny_vlm``), :mod:`.export_llamafactory`.
"""

from .trainer import train_curriculum

__all__ = ["train_curriculum"]
