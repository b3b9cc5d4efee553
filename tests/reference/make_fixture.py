#!/usr/bin/env python3
"""Build the Grad-CAM reference fixture for camflow's tests (run by hand, not by CI).

    pip install torch grad-cam safetensors
    python3 tests/reference/make_fixture.py

It builds `vgg-small` in PyTorch with the parameter names camflow writes
(conv1..conv4, fc; see src/ml/weights.rs), initialises it from a fixed seed, saves those
weights as `vgg_small.safetensors`, draws a few inputs, and writes the heatmaps that
pytorch-grad-cam computes for GradCAM, GradCAM++ and HiResCAM (target: class 1, layer: the
ReLU after conv4) into `fixture.json`. The Rust test `gradcam_matches_pytorch_grad_cam`
loads the same weights into camflow's model and compares (max abs difference < 1e-4).
"""
import json
import os

import numpy as np
import torch
from torch import nn
from safetensors.torch import save_file
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
import pytorch_grad_cam

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 32
N = 3


class VggSmall(nn.Module):
    def __init__(self, channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.relu1, self.relu2, self.relu3, self.relu4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.pool(self.relu3(self.conv3(x)))
        x = self.relu4(self.conv4(x))
        return self.fc(x.mean(dim=(2, 3)))


def main():
    torch.manual_seed(1234)
    model = VggSmall().eval()
    # Random init gives a class-1 logit that may not respond positively to anything, and
    # Grad-CAM would then be ReLU'd to zero everywhere. Mix signs so that some channels push
    # class 1 up and some down: the maps are neither empty nor trivially positive.
    with torch.no_grad():
        w = model.fc.weight
        w[1] = w[1].abs() * 4.0 - w[1].abs().mean() * 2.0
        w[0] = -w[1]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(HERE, "vgg_small.safetensors"))
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = []
    for i in range(N):
        cx, cy = rng.uniform(8, 24, size=2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 4.0 ** 2))
        images.append((0.3 * rng.random((SIZE, SIZE)) + blob).astype(np.float32))
    x = torch.from_numpy(np.stack(images)[:, None])
    out = {"size": SIZE, "inputs": x.numpy().reshape(N, -1).tolist(), "grad_cam_version": getattr(pytorch_grad_cam, "__version__", "unknown"), "torch_version": torch.__version__}
    targets = [ClassifierOutputTarget(1)] * N
    for name, cls in [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("hirescam", HiResCAM)]:
        with cls(model=model, target_layers=[model.relu4]) as cam:
            maps = cam(input_tensor=x, targets=targets)
        out[name] = np.asarray(maps, dtype=np.float64).reshape(N, -1).tolist()
    with open(os.path.join(HERE, "fixture.json"), "w") as f:
        json.dump(out, f)
    print("wrote", os.path.join(HERE, "fixture.json"))


if __name__ == "__main__":
    main()
