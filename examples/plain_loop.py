"""Self-distillation in your own PyTorch loop (docs/api.md): scikit-learn's digits, a
plain loop, plain cross-entropy (profile "ce") vs the recommended profile. The lines
marked `# lsskd` are all that change in a CE loop.  python examples/plain_loop.py"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import lsskd
from lsskd.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0 = all)")
p.add_argument("--profiles", nargs="+", default=["ce", lsskd.RECOMMENDED],
               help="profiles to train in turn (any of lsskd.profiles())")
args = p.parse_args()

d = load_digits()
x = torch.tensor(d.images, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 16 - 0.5
y = torch.tensor(d.target)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
train, test = TensorDataset(x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])

for profile in args.profiles:
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=3)  # or your own staged model
    sd = lsskd.SelfDistiller(model, profile, num_train=len(train), epochs=args.epochs)  # lsskd
    opt = torch.optim.SGD(sd.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)  # lsskd: sd.
    loader = DataLoader(lsskd.WithIndex(train), batch_size=64, shuffle=True, drop_last=True)  # lsskd
    for epoch in range(args.epochs):
        sd.train()
        sd.on_epoch_start(epoch)  # lsskd
        for step, (xb, yb, idx) in enumerate(loader):
            if args.max_steps and step == args.max_steps:
                break
            # lsskd: the samples DLB, CS-KD or DDGSD add to the batch (no-op for the others);
            # DDGSD's second view needs a random transform, which this example does not have
            xb, yb, idx = sd.with_extra(xb, yb, idx, train)
            out = sd.step(xb, yb, idx)  # lsskd: instead of F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sd.after_step()  # lsskd
        stats = sd.on_epoch_end()  # lsskd
    net = sd.deploy().eval()  # lsskd: the bare backbone (your model), no branches
    with torch.no_grad():
        acc = 100.0 * float((net(test[0]).argmax(1) == test[1]).float().mean())
    gate = f", gate {stats['gate']:.2f}" if "gate" in stats else ""
    print(f"{profile}: test top-1 {acc:.2f}, train top-1 {stats['top1']:.2f}{gate}")
