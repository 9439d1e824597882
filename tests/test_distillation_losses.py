"""Distillation losses: hand-computed values, stop-gradient structure, and DMD2 / PCM on a 2-D toy.

Toy target: an 8-mode Gaussian mixture on a circle (radius 2, std 0.15, equal weights). Under
x_t = (1 - s) x0 + s eps each mode k gives x_t ~ N((1 - s) mu_k, var_s I), var_s = (1 - s)^2 std^2 + s^2, so
    E[x0 | x_t] = sum_k post_k(x_t) [mu_k + (1 - s) std^2 / var_s (x_t - (1 - s) mu_k)],
    post_k ∝ w_k N(x_t; (1 - s) mu_k, var_s I),   exact teacher v(x_t, s) = (x_t - E[x0 | x_t]) / s.
Generator: MLP z (B, 2) -> x (B, 2), one step; fake score: MLP (x_t, s) -> v; both pure-JAX pytrees.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_jax.distillation import losses as L

K, RADIUS, STD = 8, 2.0, 0.15
_ANGLES = 2 * np.pi * np.arange(K) / K
TEACHER = {"means": jnp.asarray(np.stack([RADIUS * np.cos(_ANGLES), RADIUS * np.sin(_ANGLES)], 1), jnp.float32),
           "log_w": jnp.full((K,), -math.log(K), jnp.float32), "std": jnp.float32(STD)}


def posterior_x0(tp, x_t, sigma):
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x_t.shape[:1])[:, None]  # (B, 1)
    var = (1 - s) ** 2 * tp["std"] ** 2 + s**2
    d = x_t[:, None, :] - (1 - s)[..., None] * tp["means"][None]  # (B, K, 2)
    post = jax.nn.softmax(tp["log_w"] - 0.5 * jnp.sum(d**2, -1) / var, axis=-1)
    per_mode = tp["means"][None] + ((1 - s) * tp["std"] ** 2 / var)[..., None] * d
    return jnp.einsum("bk,bkd->bd", post, per_mode)


def teacher_v(tp):
    def v(x_t, sigma):
        s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x_t.shape[:1])[:, None]
        return (x_t - posterior_x0(tp, x_t, sigma)) / s
    return v


def sample_target(key, n):
    k_mode, k_noise = jax.random.split(key)
    return TEACHER["means"][jax.random.randint(k_mode, (n,), 0, K)] + STD * jax.random.normal(k_noise, (n, 2))


def mlp_init(key, sizes, last_scale=1.0):
    params = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, k = jax.random.split(key)
        w = jax.random.normal(k, (fan_in, fan_out)) / np.sqrt(fan_in)
        params.append({"w": w * (last_scale if i == len(sizes) - 2 else 1.0), "b": jnp.zeros((fan_out,))})
    return params


def mlp(params, h):
    for p in params[:-1]:
        h = jax.nn.silu(h @ p["w"] + p["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def fake_v(fp):
    def v(x_t, sigma):
        s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x_t.shape[:1])[:, None]
        return mlp(fp, jnp.concatenate([x_t, s, jnp.sin(np.pi * s), jnp.cos(np.pi * s)], -1))
    return v


def mmd(x, y, bandwidth=1.0):
    """Biased RBF-kernel MMD (>= 0; its floor for two 2048-sample draws of the target is ~0.03)."""
    def k(a, b):
        return jnp.exp(-jnp.sum((a[:, None] - b[None]) ** 2, -1) / (2 * bandwidth**2))
    return float(jnp.sqrt(jnp.maximum(jnp.mean(k(x, x)) + jnp.mean(k(y, y)) - 2 * jnp.mean(k(x, y)), 0.0)))


# ---- unit tests against hand-computed values ---------------------------------------------------

X = jnp.array([[1.0, 2.0], [0.0, 4.0]])
X0_REAL = jnp.array([[0.0, 0.0], [1.0, 2.0]])
X0_FAKE = jnp.array([[2.0, 2.0], [1.0, 0.0]])
# Both samples: mean|x - x0_real| = 1.5, so g = (x0_fake - x0_real) / 1.5.
G = jnp.array([[4 / 3, 4 / 3], [0.0, -4 / 3]])


def test_dmd_loss_value_gradient_and_stop_gradient():
    loss, metrics = L.dmd_loss(X, X0_REAL, X0_FAKE, eps=0.0)
    np.testing.assert_allclose(loss, 0.5 * np.mean(G**2), rtol=1e-6)  # = 2/3
    np.testing.assert_allclose(metrics["dmd_normaliser"], 1.5, rtol=1e-6)
    grads = jax.grad(lambda *a: L.dmd_loss(*a, eps=0.0)[0], argnums=(0, 1, 2))(X, X0_REAL, X0_FAKE)
    np.testing.assert_allclose(grads[0], G / X.size, rtol=1e-6)  # mean reduction: g / N, N = B * 2
    assert not np.any(grads[1]) and not np.any(grads[2])
    # The normaliser is per sample over all non-batch dims: any (B, ...) layout gives the same loss.
    np.testing.assert_allclose(L.dmd_loss(X.reshape(2, 2, 1), X0_REAL.reshape(2, 2, 1), X0_FAKE.reshape(2, 2, 1),
                                          eps=0.0)[0], loss, rtol=1e-6)
    assert np.isfinite(L.dmd_loss(X, X, X0_FAKE)[0])  # x == x0_real: the eps guard, no inf/NaN


def test_distribution_matching_loss_renoises_and_denoises_the_detached_sample():
    noise, sigma = jnp.array([[0.5, -1.0], [2.0, 0.0]]), jnp.array([0.3, 0.8])
    real, fake = (lambda x_t, s: 0.5 * x_t), (lambda x_t, s: x_t - 1.0)
    x_t = (1 - sigma[:, None]) * X + sigma[:, None] * noise
    want = L.dmd_loss(X, x_t - sigma[:, None] * real(x_t, sigma), x_t - sigma[:, None] * fake(x_t, sigma))[0]
    got, _ = L.distribution_matching_loss(X, real, fake, noise, sigma)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_regression_loss_pulls_only_the_sample_toward_the_teacher_sample():
    sample, target = jnp.array([[1.0, 2.0], [0.0, -1.0]]), jnp.array([[0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(L.regression_loss(sample, target), (1 + 0 + 1 + 4) / 4, rtol=1e-6)
    g_sample, g_target = jax.grad(L.regression_loss, argnums=(0, 1))(sample, target)
    np.testing.assert_allclose(g_sample, 2 * (sample - target) / 4, rtol=1e-6)
    assert not np.any(g_target)  # the teacher's sample is a constant


def test_dmd_timesteps_range():
    t = L.dmd_timesteps(jax.random.PRNGKey(0), (4096,))
    lo, hi = np.float32(0.02), np.float32(0.98)
    assert t.shape == (4096,) and t.min() >= lo and t.max() <= hi
    assert abs(float(t.mean()) - 0.5) < 0.02
    shifted = L.dmd_timesteps(jax.random.PRNGKey(0), (4096,), shift=3.0)
    assert shifted.min() >= lo and shifted.max() <= hi and float(shifted.mean()) > 0.6


def test_fake_score_loss_value_and_no_gradient_into_the_sample():
    x0, noise = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])

    def loss(a, x0):  # fake score v = a * x_t; at sigma 0.5: x_t = (0.5, 0.5), target v = noise - x0 = (-1, 1)
        return L.fake_score_loss(lambda x_t, s: a * x_t, x0, noise, 0.5)[0]

    np.testing.assert_allclose(loss(2.0, x0), 2.0, rtol=1e-6)  # mean((1 + 1)^2, (1 - 1)^2)
    d_a, d_x0 = jax.grad(loss, argnums=(0, 1))(2.0, x0)
    np.testing.assert_allclose(d_a, 1.0, rtol=1e-6)  # mean(2 (a x_t - v) x_t)
    assert not np.any(d_x0)


def test_gan_losses():
    f, r = jnp.array([0.0, 2.0]), jnp.array([1.0, -1.0])
    sp = lambda z: math.log1p(math.exp(z))
    np.testing.assert_allclose(L.gan_generator_loss(f), (sp(0) + sp(-2)) / 2, rtol=1e-6)
    np.testing.assert_allclose(L.gan_discriminator_loss(r, f), (sp(0) + sp(2)) / 2 + (sp(-1) + sp(1)) / 2, rtol=1e-6)
    np.testing.assert_allclose(L.gan_generator_loss(f, "hinge"), -1.0)
    np.testing.assert_allclose(L.gan_discriminator_loss(r, f, "hinge"), (1 + 3) / 2 + (0 + 2) / 2)
    with pytest.raises(ValueError, match="GAN loss"):
        L.gan_generator_loss(f, "wasserstein")


def test_projection_heads_judge_the_caption():
    from qwen_jax.distillation import heads as H

    rng = np.random.default_rng(0)
    features = tuple(jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32) for _ in range(2))
    text = jnp.asarray(rng.standard_normal((3, 4, 8)) * 30.0, jnp.float32)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    plain, proj = H.init_heads(jax.random.key(0), 16, 2), H.init_heads(jax.random.key(0), 16, 2, text_width=8)
    e = H.pooled_text(text, mask)
    # the mean over valid tokens only, normalised (padding never leaks in)
    row1 = np.asarray(text[1, :2]).mean(0)
    np.testing.assert_allclose(e[1], (row1 - row1.mean()) / np.sqrt(row1.var() + 1e-6), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(H.pooled_text(text.at[1, 2:].set(1e4), mask), e, rtol=1e-6)
    # zero projection at start: the plain heads' logits
    np.testing.assert_allclose(H.logits(proj, features, e), H.logits(plain, features), rtol=1e-6)
    with pytest.raises(ValueError, match="text"):
        H.logits(proj, features)

    # trained to call (image, its caption) real and (image, another caption) fake, only the
    # projection can tell them apart: the plain term sees the same image in both
    swapped = jnp.roll(e, 1, axis=0)

    def loss(p):
        return L.gan_discriminator_loss(H.logits(p, features, e), H.logits(p, features, swapped))

    tx = optax.adam(1e-2)
    opt = tx.init(proj)
    start = loss(proj)
    for _ in range(100):
        grads = jax.grad(loss)(proj)
        updates, opt = tx.update(grads, opt)
        proj = optax.apply_updates(proj, updates)
    assert loss(proj) < 0.2 * start
    assert float(jnp.abs(proj["0"]["proj"]).max()) > 0


def test_pseudo_huber():
    np.testing.assert_allclose(L.pseudo_huber(jnp.array([0.0, 3.0, 4.0]), jnp.zeros(3), c=1.0),
                               (math.sqrt(10) - 1 + math.sqrt(17) - 1) / 3, rtol=1e-6)
    np.testing.assert_allclose(L.pseudo_huber(jnp.array([1e-5]), jnp.zeros(1)), 1e-10 / 2e-3, rtol=1e-4)  # quadratic
    np.testing.assert_allclose(L.pseudo_huber(jnp.array([-2.0]), jnp.zeros(1)), 2.0 - 1e-3, rtol=1e-6)  # ~ |d|


def test_pcm_grid_and_phase_edges():
    grid = L.pcm_grid(num_phases=2, num_points=100, shift=3.0)
    np.testing.assert_allclose(grid.boundaries, [3 * 0.001 / 1.002, 0.75], rtol=1e-6)
    assert grid.sigmas[-1] == 1.0 and grid.sigmas[49] == 0.75 and grid.prev[50] == 0.75
    np.testing.assert_array_equal(grid.edges, np.where(np.arange(100) < 50, grid.boundaries[0], 0.75))
    phase, edge = L.pcm_phase_edges(grid.sigmas, grid.boundaries)
    np.testing.assert_array_equal(edge, grid.edges)  # sigma-based and index-based edges agree
    phase, edge = L.pcm_phase_edges(jnp.array([1.0, 0.76, 0.75, 0.5, 1e-4]), grid.boundaries)
    np.testing.assert_array_equal(phase, [1, 1, 0, 0, 0])
    np.testing.assert_allclose(L.pcm_grid(4).boundaries, [0.003, 0.5, 0.75, 0.9], atol=1e-5)
    t, r, s = L.pcm_sample_sigmas(jax.random.PRNGKey(0), 1000, grid)
    assert np.all(s <= r) and np.all(r < t) and 0 < int(np.sum(r == s)) < 100  # r == s only at phase starts


def test_pcm_loss_value_and_gradient_only_into_the_student():
    x0, noise = jnp.zeros((1, 1)), jnp.ones((1, 1))
    t, r, s = jnp.array([0.5]), jnp.array([0.4]), jnp.array([0.25])

    def loss(a, b, c):  # constant velocities a (student), b (teacher), c (target)
        const = lambda k: (lambda x, sig: jnp.full_like(x, k))
        return L.pcm_loss(const(a), const(b), const(c), x0, noise, t, r, s)[0]

    # x_t = 0.5; pred = 0.5 - 0.25 a = 0.25; x_r = 0.5 - 0.1 b = 0.3; target = 0.3 - 0.15 c = -0.15
    np.testing.assert_allclose(loss(1.0, 2.0, 3.0), math.sqrt(0.4**2 + 1e-6) - 1e-3, rtol=1e-5)
    d_a, d_b, d_c = jax.grad(loss, argnums=(0, 1, 2))(1.0, 2.0, 3.0)
    np.testing.assert_allclose(d_a, -0.25 * 0.4 / math.sqrt(0.4**2 + 1e-6), rtol=1e-5)
    assert d_b == 0 and d_c == 0
    # At a phase start (r == s) the target is the teacher step, even if theta- returns NaN there.
    nan_target = lambda x, sig: jnp.full_like(x, jnp.nan)
    got = L.pcm_loss(lambda x, sig: jnp.ones_like(x), lambda x, sig: 2 * jnp.ones_like(x), nan_target,
                     x0, noise, t, s=jnp.array([0.4]), r=jnp.array([0.4]))[0]
    np.testing.assert_allclose(got, math.sqrt(0.1**2 + 1e-6) - 1e-3, rtol=1e-5)  # pred = 0.4, x_r = 0.3


def test_update_schedule():
    got = [bool(L.should_update_generator(i, 5)) for i in range(12)]
    assert got == [i in (0, 5, 10) for i in range(12)]
    assert all(L.should_update_generator(i, 1) for i in range(4))
    np.testing.assert_array_equal(jax.jit(lambda s: L.should_update_generator(s, 3))(jnp.arange(4)),
                                  [True, False, False, True])
    with pytest.raises(ValueError):
        L.should_update_generator(0, 0)


# ---- DMD2 on the 2-D mixture --------------------------------------------------------------------

BATCH, ITERS, RATIO, HIDDEN = 256, 2000, 5, 128


def init_nets(seed):
    k_gen, k_fake = jax.random.split(jax.random.PRNGKey(seed))
    # A collapsed generator (outputs ~0, the circle's centre), so the initial MMD is large.
    return mlp_init(k_gen, [2, HIDDEN, HIDDEN, 2], last_scale=0.01), mlp_init(k_fake, [5, HIDDEN, HIDDEN, HIDDEN, 2])


def draws(key):
    k_z, k_n, k_t = jax.random.split(key, 3)
    return (jax.random.normal(k_z, (BATCH, 2)), jax.random.normal(k_n, (BATCH, 2)),
            L.dmd_timesteps(k_t, (BATCH,)))


def test_generator_and_fake_score_gradients_are_isolated():
    gp, fp = init_nets(1)
    z, noise, t = draws(jax.random.PRNGKey(2))

    def combined(gp, fp, tp):  # one differentiated computation: the generator produces x for both losses
        x = mlp(gp, z)
        return (L.distribution_matching_loss(x, teacher_v(tp), fake_v(fp), noise, t)[0],
                L.fake_score_loss(fake_v(fp), x, noise, t)[0])

    (gen_g, gen_f, gen_t), (fake_g, fake_f, fake_t) = jax.jit(jax.jacrev(combined, argnums=(0, 1, 2)))(gp, fp, TEACHER)
    nonzero = lambda tree: any(bool(np.any(a)) for a in jax.tree.leaves(tree))
    assert nonzero(gen_g) and nonzero(fake_f)
    assert not nonzero(gen_f) and not nonzero(gen_t), "the generator loss leaks into the fake score / teacher"
    assert not nonzero(fake_g) and not nonzero(fake_t), "the fake-score loss leaks into the generator / teacher"


@pytest.fixture(scope="module")
def dmd_run():
    gp, fp = init_nets(0)
    teacher_before = jax.tree.map(np.array, TEACHER)
    gen_opt, fake_opt = optax.adam(1e-3, b1=0.0), optax.adam(1e-3)
    gs, fs = gen_opt.init(gp), fake_opt.init(fp)

    @jax.jit
    def generator_step(gp, gs, fp, tp, key):
        z, noise, t = draws(key)
        grads = jax.grad(lambda gp: L.distribution_matching_loss(mlp(gp, z), teacher_v(tp), fake_v(fp), noise,
                                                                 t)[0])(gp)
        updates, gs = gen_opt.update(grads, gs, gp)
        return optax.apply_updates(gp, updates), gs

    @jax.jit
    def critic_step(fp, fs, gp, key):
        z, noise, t = draws(key)
        grads = jax.grad(lambda fp: L.fake_score_loss(fake_v(fp), mlp(gp, z), noise, t)[0])(fp)
        updates, fs = fake_opt.update(grads, fs, fp)
        return optax.apply_updates(fp, updates), fs

    z_eval, y_eval = jax.random.normal(jax.random.PRNGKey(10), (2048, 2)), sample_target(jax.random.PRNGKey(11), 2048)
    mmd_init = mmd(mlp(gp, z_eval), y_eval)
    key = jax.random.PRNGKey(4)
    for step in range(ITERS):  # DMD2's order: generator turn (if due), then the critic on the new samples
        key, k_gen, k_critic = jax.random.split(key, 3)
        if L.should_update_generator(step, RATIO):
            gp, gs = generator_step(gp, gs, fp, TEACHER, k_gen)
        fp, fs = critic_step(fp, fs, gp, k_critic)
    return {"mmd_init": mmd_init, "mmd_final": mmd(mlp(gp, z_eval), y_eval),
            "mmd_floor": mmd(sample_target(jax.random.PRNGKey(12), 2048), y_eval), "teacher_before": teacher_before,
            "gen_updates": int(optax.tree_utils.tree_get(gs, "count")),
            "critic_updates": int(optax.tree_utils.tree_get(fs, "count"))}


def test_dmd2_moves_the_generator_to_the_target(dmd_run):
    print(f"MMD init {dmd_run['mmd_init']:.4f} -> final {dmd_run['mmd_final']:.4f} "
          f"(x{dmd_run['mmd_init'] / dmd_run['mmd_final']:.1f}; two target draws: {dmd_run['mmd_floor']:.4f})")
    assert dmd_run["mmd_init"] > 0.5
    assert dmd_run["mmd_final"] * 10 <= dmd_run["mmd_init"]


def test_dmd2_leaves_the_teacher_bit_identical(dmd_run):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, TEACHER), dmd_run["teacher_before"])


def test_dmd2_update_counts_follow_the_ratio(dmd_run):
    assert dmd_run["gen_updates"] == sum(bool(L.should_update_generator(i, RATIO)) for i in range(ITERS)) == 400
    assert dmd_run["critic_updates"] == ITERS


# ---- PCM with the exact teacher -----------------------------------------------------------------


def ode(v, x, t, s, n=32):
    """RK4 of dx/dsigma = v(x, sigma) from per-sample t to s."""
    h = (s - t) / n

    def body(_, carry):
        x, sig = carry
        k1 = v(x, sig)
        k2 = v(x + h[:, None] / 2 * k1, sig + h / 2)
        k3 = v(x + h[:, None] / 2 * k2, sig + h / 2)
        k4 = v(x + h[:, None] * k3, sig + h)
        return x + h[:, None] / 6 * (k1 + 2 * k2 + 2 * k3 + k4), sig + h

    return jax.lax.fori_loop(0, n, body, (x, t))[0]


def test_pcm_loss_vanishes_for_the_exact_consistency_map():
    tv = teacher_v(TEACHER)
    # The exact teacher is right: its ODE carries noise onto the target (down to sigma ~0.003, then E[x0|x]).
    z = jax.random.normal(jax.random.PRNGKey(20), (2048, 2))
    x_end = ode(tv, z, jnp.ones(2048), jnp.full(2048, 0.003), n=64)
    samples = posterior_x0(TEACHER, x_end, 0.003)
    assert mmd(samples, sample_target(jax.random.PRNGKey(21), 2048)) < 0.06

    def run(num_points):
        grid = L.pcm_grid(2, num_points, 3.0)

        def exact(x, sigma):  # the consistency map's velocity: (ODE(x, sigma -> edge) - x) / (edge - sigma)
            sigma = jnp.broadcast_to(sigma, x.shape[:1])
            edge = L.pcm_phase_edges(sigma, grid.boundaries)[1]
            return (ode(tv, x, sigma, edge) - x) / (edge - sigma)[:, None]  # inf at r == s: masked in pcm_loss

        k_x, k_n, k_t = jax.random.split(jax.random.PRNGKey(22), 3)
        args = sample_target(k_x, 1024), jax.random.normal(k_n, (1024, 2)), *L.pcm_sample_sigmas(k_t, 1024, grid)
        perturbed = lambda x, s: exact(x, s) + 0.3 * jnp.sin(2 * x)
        students = {"exact": exact, "teacher": tv, "perturbed": perturbed}
        # theta- = the student itself, as in PCM's released code (stop-gradient, no EMA).
        return {name: float(jax.jit(lambda *a, f=f: L.pcm_loss(f, tv, f, *a)[0])(*args))
                for name, f in students.items()}

    coarse, fine = run(100), run(400)
    print(f"PCM loss N=100 {coarse}, N=400 {fine}")
    # The exact map is consistent up to the teacher's one-step Euler error, orders below the others.
    assert coarse["exact"] < coarse["perturbed"] / 5 and coarse["exact"] < coarse["teacher"] / 30
    # A student initialised as the teacher (one Euler jump to the edge) is consistent only up to
    # O(grid spacing): its loss falls about 4x on a 4x finer grid.
    assert fine["teacher"] < coarse["teacher"] / 2.5
