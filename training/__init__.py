"""emomerge.training: curriculum training of stage adapters, over the shared model/data layer.

Entry points: :func:`.trainer.train_curriculum` (stage adapters with lineage),
:mod:`.export_llamafactory`; the layer evaluation shares (DESIGN.md, Layers): :mod:`.data`
(``read_dataset``), :mod:`.models.families` (``FAMILIES``, ``detect_family``),
:mod:`.models.loading` (``load_vlm``), :mod:`.models.tiny` (``build_tiny_vlm``).

Importing this package imports nothing: evaluation reads ``emomerge.training.data`` and
``emomerge.training.models`` without loading the trainer (``tests/test_layers.py``).
"""
