"""Write the example's weights: ``python make_weights.py OUT_DIR`` → OUT_DIR/model.safetensors (what
fastload loads) and OUT_DIR/model.pth (the same weights as a stock torch.save state dict).

Seeded, so the weights, and therefore the predictions, are the same on every run.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import TinyClassifier


def main(out: Path) -> None:
    torch.manual_seed(0)
    state = TinyClassifier().state_dict()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors")
    torch.save(state, out / "model.pth")
    print(f"wrote {out / 'model.safetensors'} and {out / 'model.pth'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python make_weights.py OUT_DIR")
    main(Path(sys.argv[1]))
