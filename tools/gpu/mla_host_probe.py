"""Host time of one MLA decode launch (issue 17: B = 32 rows ran 183 us eager against 75 us graphed): the
microseconds the host spends per call of ``ops.mla._decode_launch`` (serial Gluon config, bf16 cache, B 32,
S 1024) when the GPU is not the limit, and a cProfile of those calls (top functions by own time).
Run from the repo root on a GPU: python tools/gpu/mla_host_probe.py"""
import cProfile
import io
import pstats
import sys
import time

sys.path.insert(0, "bench")
import torch  # noqa: E402

import bench_mla as bm  # noqa: E402

for B, S in ((32, 1024), (128, 4096)):
    d = bm.decode_data(B, S)
    for name, cfg in (("shipped", None), ("serial", dict(bm.dec_cfg(64, 64, 8, 2), GLUON=1)),
                      ("seesaw", dict(bm.dec_cfg(64, 64, 8, 2), GLUON=2))):
        fn = bm.ours_fn(d, "bf16", cfg, 0)
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e6
        print(f"B={B} S={S} {name}: host {host:.1f} us/call, wall {wall:.1f} us/call", flush=True)
    if B == 32:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue())
    del d
