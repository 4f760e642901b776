"""emomerge: sequential transfer learning and exact merging of LoRA adapters for VLMs."""

__version__ = "0.1.0"
