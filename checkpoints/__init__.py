"""Weight I/O (safetensors only) and the small pretrained weights shipped under checkpoints/pretrained/."""
from pathlib import Path

PRETRAINED = Path(__file__).parent / "pretrained"
