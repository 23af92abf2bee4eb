"""Load monitoring and the two balancing rules on a skewed token distribution."""
import pytest
import torch

import moe_kernels as mk

H, E, K = 128, 16, 2


BASE = torch.randn(H, generator=torch.Generator().manual_seed(7))


def skewed_tokens(n, gen):
    """Tokens clustered around one direction: a plain router sends most of them to the same few experts."""
    return BASE + torch.randn(n, H, generator=gen)


def run(balance, scoring="softmax", steps=40, train=False):
    gen = torch.Generator().manual_seed(1)
    router = mk.TopKRouter(H, E, K, scoring=scoring, balance=balance, gamma=0.02)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=gen) * 0.2)
    router.train(train)
    imbalance = []
    for _ in range(steps):
        _, _, counts = router(skewed_tokens(256, gen))
        c = counts.float()
        imbalance.append(float(c.max() / c.mean()))
    return imbalance, router


def test_counts_feed_the_load_monitor():
    router = mk.TopKRouter(H, E, K)
    _, ids, counts = router(torch.randn(33, H))
    assert int(counts.sum()) == 33 * K
    assert torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=E).int())
    stats = router.load_stats()
    assert stats["steps"] == 1 and torch.equal(stats["per_expert"], counts.float())
    assert stats["max_over_mean"] == pytest.approx(float(counts.max()) / float(counts.float().mean()))


@pytest.mark.parametrize("rule, scoring, train", [("adaptive", "softmax", False), ("bias", "sigmoid", True)])
def test_balancing_lowers_max_over_mean(rule, scoring, train):
    plain, _ = run(None, scoring, train=train)
    balanced, router = run(rule, scoring, train=train)
    late_plain = sum(plain[-10:]) / 10
    late_bal = sum(balanced[-10:]) / 10
    print(f"{rule}: max/mean load over the last 10 steps {late_bal:.2f} vs {late_plain:.2f} unbalanced")
    assert late_bal < 0.9 * late_plain
    assert router.load_stats()["steps"] == 40


def test_bias_rule_only_moves_in_training():
    _, router = run("bias", "sigmoid", steps=5, train=False)
    assert torch.all(router.e_score_correction_bias == 0)
