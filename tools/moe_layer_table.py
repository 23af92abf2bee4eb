"""Print bench/README.md's MoE-layer table from a bench_moe_layer.py result file.

    python tools/moe_layer_table.py bench/results/moe_layer-NVIDIA_H200.json
"""
import json
import sys


def main(path):
    d = json.load(open(path))
    env = d["environment"]
    print(f"`{env['command']}` on one {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"{env['date'][:10]}); result: [`{path.split('bench/')[-1]}`]({path.split('bench/')[-1]}).\n")
    print("| case | precision | T | ours ms | TFLOP/s | torch composition ms | x composition | x faster torch pipeline "
          "| naive loop ms | x naive | rel. err ours | rel. err composition |")
    print("|" + "---|" * 12)
    for r in d["rows"]:
        print(f"| {r['case']} ({r['experts']} experts, top-{r['top_k']}) | {r['precision']} | {r['T']} | "
              f"{r['ours_ms']:.3f} | {r['ours_tflops']:.0f} | {r['composition_ms']:.3f} | {r['vs_composition']:.2f} | "
              f"{r.get('vs_best_torch', float('nan')):.2f} | {r['naive_ms']:.2f} | {r['vs_naive']:.2f} | "
              f"{r['err_ours']:.1e} | {r['err_composition']:.1e} |")


if __name__ == "__main__":
    main(sys.argv[1])
