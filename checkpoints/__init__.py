"""Weight I/O (safetensors only) and the small pretrained weights shipped under checkpoints/pretrained/."""
from pathlib import Path

PRETRAINED = Path(__file__).parent / "pretrained"
# what `sigma sample` / `sigma eval` use when no --model is given (each reproducible: see README)
SHIPPED = {
    "imm": PRETRAINED / "imm",  # an IMM pipeline folder: transformer/, scheduler/, tokenizer/
    "tokenizer": PRETRAINED / "imm" / "tokenizer",  # the shapes tokenizer the IMM model was trained on
    "classifier": PRETRAINED / "classifier",  # the shapes classifier behind `sigma eval`'s features
}
