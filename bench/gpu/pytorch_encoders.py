"""The PyTorch side of bench/gpu/run.sh's encoder table: diffusers' AutoencoderKL with SD2's VAE
config on 256 px images (encode + posterior sample) and transformers' CLIPTextModel with SD2's
text config on 77 tokens (penultimate hidden state), random weights, no grad, in bf16 (and f32),
timed as `gpu_encoders` times latentflow's (CUDA events around `--iters` passes after two warm-up
passes). Configs come from `gpu_encoders --config-dir`. Prints one JSON line per encoder and
precision. `--device cpu` (run.sh --dry-run): tiny batches on the CPU, wall clock, to prove the
imports and configs.

usage: pytorch_encoders.py --config-dir DIR [--vae-batch 64] [--text-batch 256] [--iters 5]
                           [--precisions bf16,f32] [--device cuda|cpu]
"""

import argparse
import json
import os
import sys

from pytorch_components import time_ms  # the same CUDA-event timing


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", required=True)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--text-batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--precisions", default="bf16,f32")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args()
    try:
        import torch
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel
    except Exception as e:  # noqa: BLE001 - report why the baseline could not run
        print(json.dumps({"framework": "pytorch", "error": f"cannot import torch/diffusers/transformers: {e}"}))
        return 1
    cuda = a.device == "cuda"
    dev = torch.device("cuda:0" if cuda else "cpu")
    vae_config = json.load(open(os.path.join(a.config_dir, "vae_config.json")))
    text_config = json.load(open(os.path.join(a.config_dir, "text_config.json")))
    failed = False
    for precision in a.precisions.split(","):
        dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[precision.strip()]
        for encoder, batch in [("vae", a.vae_batch), ("text", a.text_batch)]:
            line = {"framework": "pytorch", "encoder": encoder, "precision": precision.strip(), "batch": batch}
            try:
                torch.manual_seed(0)
                if encoder == "vae":
                    model = AutoencoderKL.from_config(vae_config).to(dev, dtype).eval()
                    x = torch.rand(batch, 3, 256, 256, device=dev, dtype=dtype) * 2 - 1
                    run = lambda: model.encode(x).latent_dist.sample()  # noqa: E731
                else:
                    model = CLIPTextModel(CLIPTextConfig(**text_config)).to(dev, dtype).eval()
                    ids = torch.randint(0, text_config["vocab_size"], (batch, 77), device=dev)
                    run = lambda: model(ids, output_hidden_states=True).hidden_states[-2]  # noqa: E731
                with torch.no_grad():
                    ms = time_ms(torch, a.iters, run, cuda)
                line["per_s"] = batch / (ms / 1000)
            except Exception as e:  # noqa: BLE001 - one failing must not hide the others
                failed = True
                line["error"] = str(e)[:300]
            print(json.dumps(line), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
