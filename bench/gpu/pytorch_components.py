"""The PyTorch + diffusers side of bench/gpu/run.sh's per-component table: the same pieces of the
SD2-base step that `gpu_components` times in latentflow, timed the same way (CUDA events around
`--iters` runs after two warm-up runs; forward + backward from the output's sum; f32 modules
under bf16 autocast, bf16 activations), plus the kernel launches of one whole training step
(torch.profiler) when `--step-config` names the UNet config. Prints one JSON line per piece.

usage: pytorch_components.py [--batch 32] [--iters 5] [--step-config unet_config.json] [--device cpu]
(`--device cpu`, for run.sh --dry-run: the same pieces on the CPU, timed by the wall clock, no
launch count.)
"""

import argparse
import json
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--step-config")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from diffusers import UNet2DConditionModel
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
    except Exception as e:  # noqa: BLE001 - report why the baseline could not run
        print(json.dumps({"framework": "pytorch", "error": f"cannot import torch/diffusers: {e}"}))
        return 1
    torch.manual_seed(0)
    cuda = a.device == "cuda"
    dev = torch.device("cuda:0" if cuda else "cpu")
    b = a.batch

    def report(component, fn):
        try:
            ms = time_ms(torch, a.iters, fn, cuda)
            line = {"framework": "pytorch", "component": component, "batch": b, "ms": ms}
        except Exception as e:  # noqa: BLE001 - one piece failing must not hide the others
            line = {"framework": "pytorch", "component": component, "batch": b, "error": str(e)[:300]}
        print(json.dumps(line), flush=True)

    def activation(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def forward_backward(forward):
        def run():
            with torch.autocast(a.device, dtype=torch.bfloat16):
                y = forward()
            y.float().sum().backward()
        return run

    for channels, size in [(320, 32), (640, 16), (1280, 8), (1280, 4)]:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dev)
        x = activation(b, channels, size, size)
        report(f"conv3x3 {channels}ch {size}x{size} fwd+bwd", forward_backward(lambda: conv(x)))

    norm = torch.nn.GroupNorm(32, 320, eps=1e-5).to(dev)
    x = activation(b, 320, 32, 32)
    report("groupnorm+silu 320ch 32x32 fwd+bwd", forward_backward(lambda: F.silu(norm(x))))

    def heads(t):  # [B, N, H*D] -> [B, H, N, D], as diffusers' attention processor does
        return t.view(b, t.shape[1], 5, 64).transpose(1, 2)

    q, kv, text_kv = activation(b, 1024, 320), activation(b, 1024, 320), activation(b, 77, 320)
    attend = lambda k: F.scaled_dot_product_attention(heads(q), heads(k), heads(k)).transpose(1, 2).reshape(b, 1024, 320)
    report("attention self 1024 tokens, 5 heads x 64 fwd+bwd", forward_backward(lambda: attend(kv)))
    report("attention cross 1024x77, 5 heads x 64 fwd+bwd", forward_backward(lambda: attend(text_kv)))

    resnet = ResnetBlock2D(in_channels=320, out_channels=320, temb_channels=1280, groups=32, eps=1e-5).to(dev)
    temb = activation(b, 1280)
    report("resnet block 320ch 32x32 fwd+bwd", forward_backward(lambda: resnet(x, temb)))

    transformer = Transformer2DModel(
        num_attention_heads=5, attention_head_dim=64, in_channels=320, num_layers=1, cross_attention_dim=1024,
        use_linear_projection=True, norm_num_groups=32,
    ).to(dev)
    context = activation(b, 77, 1024)
    report("transformer block 320ch 32x32 fwd+bwd", forward_backward(lambda: transformer(x, context).sample))

    if a.step_config:
        config = json.load(open(a.step_config))
        unet = UNet2DConditionModel.from_config(config).to(dev).train()
        params = [p for p in unet.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        report(f"optimizer step: grad norm + clipped AdamW, {len(params)} tensors", optimizer_step)
        if cuda:
            print(json.dumps(step_launches(torch, unet, opt, config, b, dev)), flush=True)
    return 0


def time_ms(torch, iters, fn, cuda):
    for _ in range(2):
        fn()
    if not cuda:
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - started) * 1000 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def step_launches(torch, unet, opt, config, b, dev):
    """Kernels launched by one whole training step (forward, backward, clip, AdamW)."""
    latents = torch.randn(b, config.get("in_channels", 4), 32, 32, device=dev)
    text = torch.randn(b, 77, config["cross_attention_dim"], device=dev)
    t = torch.randint(0, 1000, (b,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(latents, t, encoder_hidden_states=text).sample
        torch.nn.functional.mse_loss(pred.float(), latents).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"framework": "pytorch", "component": "kernel launches per training step", "batch": b, "count": kernels}


if __name__ == "__main__":
    sys.exit(main())
