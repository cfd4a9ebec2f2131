"""Self-distillation with PyTorch Lightning (docs/api.md): the recommended profile on
scikit-learn's digits, a held-out split for validation, checkpoints that resume with the
method's state. Needs `pip install -e ".[lightning]"`.

    python examples/lightning_fit.py                        # 10 epochs, one process
    python examples/lightning_fit.py --devices 2            # DDP, two CPU processes (gloo)
    python examples/lightning_fit.py --resume runs/lightning/last.ckpt
"""
import argparse
import json

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import lsskd
from lsskd.lightning import SelfDistillModule
from lsskd.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--profile", default=lsskd.RECOMMENDED)
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--limit-batches", type=float, default=1.0, help="training batches per epoch (or fraction)")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--precision", default="16-mixed" if torch.cuda.is_available() else "32-true")
p.add_argument("--out", default="runs/lightning")
p.add_argument("--resume", default=None, help="a checkpoint to continue from")
args = p.parse_args()

pl.seed_everything(0)
d = load_digits()
x = torch.tensor(d.images, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 16 - 0.5
y = torch.tensor(d.target)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
tr, va, te = perm[:1200], perm[1200:1440], perm[1440:]  # train / held-out / test
train = TensorDataset(x[tr], y[tr])

module = SelfDistillModule(build_model("resnet8", num_classes=10), args.profile, num_train=len(train),
                           epochs=args.epochs, has_val=True, optim={"lr": 0.05, "weight_decay": 5e-4})
ckpt = pl.callbacks.ModelCheckpoint(dirpath=args.out, save_last=True)
trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=args.devices,
                     strategy="ddp" if args.devices > 1 else "auto", precision=args.precision,
                     limit_train_batches=args.limit_batches, callbacks=[ckpt], logger=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, DataLoader(lsskd.WithIndex(train), batch_size=64, shuffle=True, drop_last=True),
            DataLoader(TensorDataset(x[va], y[va]), batch_size=256), ckpt_path=args.resume)

if trainer.is_global_zero:
    net = module.deploy().eval()  # the bare backbone: ship this
    with torch.no_grad():
        test_top1 = 100.0 * float((net(x[te]).argmax(1) == y[te]).float().mean())
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    print(json.dumps({"profile": args.profile, "test_top1": test_top1, "checkpoint": ckpt.last_model_path,
                      **metrics}, sort_keys=True))
