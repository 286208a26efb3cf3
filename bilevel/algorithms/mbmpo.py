"""Minimum-attention MB-MPO: model-based meta-policy optimisation with a smoothness penalty.

MB-MPO (Clavera et al. 2018, "Model-Based Reinforcement Learning via Meta-Policy Optimization",
Alg. 1) treats every elite model ``f_m`` of a probabilistic dynamics ensemble as a task. With the
minimum attention criterion of Brockett (the meta-RL paper: arXiv 2505.16741) added to every task
objective, one meta-step over ``M`` elites is

    D_m   = N imagined trajectories of pi_theta in f_m from real start states    (`imagine`)
    theta'_m(theta) = theta - beta grad[L_PG(theta; D_m) + alpha P(theta; D_m)]  (`unroll`, K steps)
    D'_m  = N imagined trajectories of pi_{theta'_m} in f_m
    L(theta)  = mean_m -mean_{D'_m}[pi_{theta'_m}(a|s) / pi_old,m(a|s) A] + alpha P(theta'_m; D'_m)
    KL(theta) = mean_m  mean_{D'_m}[KL(pi_old,m(.|s) || pi_{theta'_m}(.|s))]
    theta <- trpo_step(L, KL, theta)                                   (KL <= max_kl)

with the minimum attention penalty (`bilevel.regularizers.minimum_attention`)

    P(theta; D) = alpha_x mean_{t,b} ||d mu_theta(s_tb) / d s||_F^2
                + alpha_t mean_{t,b} ||(mu_theta(s_t+1,b) - mu_theta(s_tb)) / dt||^2

where ``mu_theta`` is the policy's mean action and ``s`` the *normalised* state (real observations
standardised by the mean and standard deviation of all real data, refitted at the start of each
iteration; the policy reads normalised states). So ``alpha * alpha_x`` is the price of one unit of
``(d action / d (state / std))^2`` summed over the Jacobian's entries, and ``alpha * alpha_t`` the price
of one ``(action unit / second)^2``, with ``dt = env.unwrapped.dt`` (0.05 s for HalfCheetah, 0.008 s
for Hopper and Walker2d). ``alpha = 0`` is plain MB-MPO.

``penalty_as_reward`` moves the penalty from the losses into the rewards: the per-step penalty of
the policy that imagined a batch, ``alpha (alpha_x ||J(s_t)||^2 + alpha_t ||(mu(s_t) - mu(s_t-1)) / dt||^2)``,
is subtracted from each imagined reward before the advantages are estimated, so that it acts through
the score function only (the paper's "as part of the rewards").

Per iteration: (first iteration only) ``initial_random_steps`` of uniform random actions; the
ensemble is fitted on all real transitions (elites by holdout loss); ``meta_steps`` meta-steps as
above, each on fresh imagined data; then each elite's adapted policy collects
``episodes_per_model`` real episodes (MB-MPO's data collection). The adaptation and both outer
objectives are one ``torch.func.vmap`` over the model axis. Advantages are GAE over a linear feature
baseline fitted per model, standardised per model; imagined episodes end at the imagined horizon.

Shapes: ``M`` elite models, ``T`` steps, ``N`` imagined trajectories per model (``B`` real episodes),
``D`` and ``A`` the observation and action sizes; per-model tensors are ``[T, N, ...]``, stacked
``[M, T, N, ...]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bilevel import tree
from bilevel.envs.energy import EnergyMeter
from bilevel.envs.perturbations import perturb as perturb_env
from bilevel.envs.rewards import (
    half_cheetah_reward,
    hopper_reward,
    hopper_termination,
    walker2d_reward,
    walker2d_termination,
)
from bilevel.inner import unroll
from bilevel.nets import DiagGaussian, GaussianMLPPolicy, ProbabilisticEnsemble, gaussian_kl, mean_action_fn
from bilevel.regularizers import MinimumAttention, minimum_attention
from bilevel.rl import Imagined, collect_episodes, imagine, importance_weighted_loss, masked_mean, reinforce_loss
from bilevel.rl.meta_batches import Behaviour, TaskData, TaskEpisodes, standardized_advantages
from bilevel.rl.trajectories import Trajectories
from bilevel.runs import Learner, RunConfig, derive_seed, register
from bilevel.tree import Tree
from bilevel.trpo import TRPOInfo, TRPOSettings, trpo_step

__all__ = [
    "ENV_IDS",
    "MBMPO",
    "OOD_PERTURBATIONS",
    "AttentionPenalty",
    "InnerLoop",
    "MBMPOConfig",
    "adapt",
    "adapt_models",
    "attention_terms",
    "imagine_models",
    "meta_kl_outputs",
    "meta_loss_and_kl",
    "meta_objectives",
    "meta_update",
    "model_data",
    "sequential_apply",
    "shaping_penalty",
]

ENV_IDS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}
REWARD_FNS = {"halfcheetah": half_cheetah_reward, "hopper": hopper_reward, "walker2d": walker2d_reward}
TERMINATION_FNS = {"hopper": hopper_termination, "walker2d": walker2d_termination}
CRIPPLED_JOINTS = {"halfcheetah": "bthigh", "hopper": "foot_joint", "walker2d": "foot_joint"}
"""The joint disabled by ``perturb="crippled-joint"``: HalfCheetah's back thigh (the paper's crippled
back leg), the (right) foot of Hopper and Walker2d."""
OOD_PERTURBATIONS = ("mass", "crippled-joint", "slope")
"""Meta-test perturbations: every body's mass and inertia x 1.5, one joint's actuator disabled, gravity
tilted by 10 degrees (uphill for forward motion)."""
FISHER_PRODUCTS = ("exact", "gauss-newton")
"""`MBMPOConfig.fisher_product`'s choices."""
SEED_PURPOSES = {"random": 0, "model": 1, "imagine": 2, "real": 3, "real_envs": 4}


class AttentionPenalty(NamedTuple):
    """``alpha (alpha_x spatial + alpha_t temporal)`` (see the module docstring for the units).

    ``weight``: alpha; ``spatial_weight``/``temporal_weight``: alpha_x, alpha_t; ``dt``: the control
    step in seconds; ``as_reward``: subtract the per-step penalty from imagined rewards instead of
    adding the mean penalty to the losses."""

    weight: float
    spatial_weight: float = 1.0
    temporal_weight: float = 1.0
    dt: float = 0.05
    as_reward: bool = False

    @property
    def in_loss(self) -> bool:
        return self.weight != 0 and not self.as_reward


class InnerLoop(NamedTuple):
    """One model's adaptation: ``steps`` SGD steps of size ``lr`` on the penalised policy-gradient loss."""

    policy: nn.Module
    lr: float
    steps: int
    penalty: AttentionPenalty
    first_order: bool = False


def normalise(obs: Tensor, obs_mean: Tensor, obs_std: Tensor) -> Tensor:
    """``(obs - mean) / std``, ``[..., D]``."""
    return (obs - obs_mean) / obs_std


def policy_distribution(policy: nn.Module, params: Tree, norm_obs: Tensor) -> DiagGaussian:
    """``pi_params(. | s)`` at normalised states ``[..., D]``; batch shape ``[...]``.

    A `GaussianMLPPolicy` whose mean net is linear layers and parameter-free activations is evaluated as
    `sequential_apply` of ``params`` (the operations ``functional_call`` runs, without swapping the module's
    parameters on every call: imagination calls this once per step)."""
    if isinstance(policy, GaussianMLPPolicy) and _plain_sequential(policy.mean_net):
        return DiagGaussian(sequential_apply(policy.mean_net, params, "mean_net", norm_obs), params["log_std"])
    return functional_call(policy, params, (norm_obs,))


def _plain_sequential(net: nn.Module) -> bool:
    return isinstance(net, nn.Sequential) and all(
        isinstance(layer, nn.Linear) or (next(layer.parameters(), None) is None and next(layer.buffers(), None) is None)
        for layer in net)


def sequential_apply(net: nn.Sequential, params: Tree, prefix: str, x: Tensor) -> Tensor:
    """``net(x)`` with the parameters ``params[f"{prefix}.{i}.weight"]``, ``params[f"{prefix}.{i}.bias"]`` for the
    ``i``-th layer, ``x [..., in] -> [..., out]``: ``F.linear`` for the linear layers, the module itself for the
    parameter-free ones."""
    for index, layer in enumerate(net):
        if isinstance(layer, nn.Linear):
            x = F.linear(x, params[f"{prefix}.{index}.weight"], params.get(f"{prefix}.{index}.bias"))
        else:
            x = layer(x)
    return x


def attention_terms(policy: nn.Module, params: Tree, norm_obs: Tensor, valid: Tensor | None,
                    penalty: AttentionPenalty, *, reduce: bool = True) -> MinimumAttention:
    """The minimum attention terms of the mean action at time-major normalised states ``[T, B, D]``
    (``valid [T, B]``): 0-dim means, or per step ``[T, B]`` when not ``reduce``."""
    return minimum_attention(mean_action_fn(policy), params, norm_obs, dt=penalty.dt,
                             spatial_weight=penalty.spatial_weight, temporal_weight=penalty.temporal_weight,
                             valid=valid, reduce=reduce)


def penalised_pg_loss(params: Tree, data: TaskData, inner: InnerLoop) -> Tensor:
    """One model's inner loss ``-mean_valid[log pi(a|s) A] + alpha P(params; data)`` (``P`` only when the
    penalty is a loss term); ``data.obs`` normalised, ``[T, N, ...]``."""
    log_probs = policy_distribution(inner.policy, params, data.obs).log_prob(data.actions)
    loss = reinforce_loss(log_probs, data.advantages, data.valid)
    if inner.penalty.in_loss:
        loss = loss + inner.penalty.weight * attention_terms(inner.policy, params, data.obs, data.valid,
                                                             inner.penalty).total
    return loss


def adapt(meta_params: Tree, data: TaskData, inner: InnerLoop) -> Tree:
    """``theta'_m = unroll(L_PG + alpha P, theta, sgd(beta), K)`` on one model's batch (MB-MPO eq. 2)."""
    return unroll(functools.partial(penalised_pg_loss, data=data, inner=inner), meta_params,
                  torchopt.sgd(inner.lr), inner.steps, first_order=inner.first_order)


def adapt_models(meta_params: Tree, data: TaskData, inner: InnerLoop) -> Tree:
    """`adapt` for every model of ``data`` (``[M, T, N, ...]``) in one vmap; a tree with a leading ``[M]``."""
    return vmap(adapt, in_dims=(None, 0, None))(meta_params, data, inner)


def adapted_surrogate_loss(adapted_params: Tree, distribution: DiagGaussian, post: TaskData, behaviour: Behaviour,
                           inner: InnerLoop) -> Tensor:
    """The outer loss of an adapted policy ``theta'_m`` whose distribution on ``post.obs`` is ``distribution``: the
    importance-weighted surrogate on the post-adaptation batch, plus ``alpha P(theta'_m; post)`` when the penalty
    is a loss term."""
    loss = importance_weighted_loss(distribution.log_prob(post.actions), behaviour.log_probs, post.advantages,
                                    post.valid)
    if inner.penalty.in_loss:
        loss = loss + inner.penalty.weight * attention_terms(inner.policy, adapted_params, post.obs, post.valid,
                                                             inner.penalty).total
    return loss


def behaviour_kl(behaviour: Behaviour, mean: Tensor, log_std: Tensor, valid: Tensor) -> Tensor:
    """``mean_valid KL(pi_old,m(.|s) || N(mean, exp(log_std)^2))`` over one model's post-adaptation states."""
    return masked_mean(gaussian_kl(behaviour.mean, behaviour.log_std, mean, log_std), valid)


def model_surrogate_loss(meta_params: Tree, pre: TaskData, post: TaskData, behaviour: Behaviour,
                         inner: InnerLoop) -> Tensor:
    """One model's outer loss (`adapted_surrogate_loss`) as a function of the meta-parameters."""
    adapted_params = adapt(meta_params, pre, inner)
    distribution = policy_distribution(inner.policy, adapted_params, post.obs)
    return adapted_surrogate_loss(adapted_params, distribution, post, behaviour, inner)


def model_kl(meta_params: Tree, pre: TaskData, post: TaskData, behaviour: Behaviour, inner: InnerLoop) -> Tensor:
    """One model's `behaviour_kl` of ``pi_{theta'_m(theta)}`` as a function of the meta-parameters."""
    distribution = policy_distribution(inner.policy, adapt(meta_params, pre, inner), post.obs)
    return behaviour_kl(behaviour, distribution.mean, distribution.log_std, post.valid)


def model_loss_and_kl(meta_params: Tree, pre: TaskData, post: TaskData, behaviour: Behaviour,
                      inner: InnerLoop) -> tuple[Tensor, Tensor]:
    """`model_surrogate_loss` and `model_kl` from one adaptation ``theta'_m`` and one pass of ``pi_{theta'_m}``
    over the post-adaptation states (the line search evaluates both at every candidate)."""
    adapted_params = adapt(meta_params, pre, inner)
    distribution = policy_distribution(inner.policy, adapted_params, post.obs)
    return (adapted_surrogate_loss(adapted_params, distribution, post, behaviour, inner),
            behaviour_kl(behaviour, distribution.mean, distribution.log_std, post.valid))


def meta_loss_and_kl(pre: TaskData, post: TaskData, behaviour: Behaviour,
                     inner: InnerLoop) -> Callable[[Tree], tuple[Tensor, Tensor]]:
    """``theta -> (L(theta), KL(theta))`` of `meta_objectives` in one vmap over models (`model_loss_and_kl`)."""

    def loss_and_kl(meta_params: Tree) -> tuple[Tensor, Tensor]:
        losses, kls = vmap(model_loss_and_kl, in_dims=(None, 0, 0, 0, None))(meta_params, pre, post, behaviour,
                                                                             inner)
        return losses.mean(), kls.mean()

    return loss_and_kl


def meta_objectives(pre: TaskData, post: TaskData, behaviour: Behaviour,
                    inner: InnerLoop) -> tuple[Callable[[Tree], Tensor], Callable[[Tree], Tensor]]:
    """``(L, KL)`` of the meta-parameters, each the mean over models of one vmapped per-model computation."""
    in_dims = (None, 0, 0, 0, None)

    def meta_loss(meta_params: Tree) -> Tensor:
        return vmap(model_surrogate_loss, in_dims=in_dims)(meta_params, pre, post, behaviour, inner).mean()

    def meta_kl(meta_params: Tree) -> Tensor:
        return vmap(model_kl, in_dims=in_dims)(meta_params, pre, post, behaviour, inner).mean()

    return meta_loss, meta_kl


def behaviour_of(policy: nn.Module, adapted_params: Tree, post: TaskData) -> Behaviour:
    """The per-model adapted policies (leading ``[M]``) at their post-adaptation batch, detached."""

    def one_model(params: Tree, norm_obs: Tensor, actions: Tensor) -> Behaviour:
        distribution = policy_distribution(policy, params, norm_obs)
        return Behaviour(distribution.log_prob(actions), distribution.mean, distribution.log_std)

    with torch.no_grad():
        return vmap(one_model)(tree.detach(adapted_params), post.obs, post.actions)


def meta_kl_outputs(pre: TaskData, post: TaskData, behaviour: Behaviour,
                    inner: InnerLoop) -> tuple[Callable[[Tree], tuple[Tensor, Tensor]], Callable[..., Tensor]]:
    """``KL(theta)`` of `meta_objectives` split as ``output_kl(outputs(theta))`` for Gauss-Newton Fisher products:
    ``outputs(theta) = (mean [M, T, N, A], log_std [M, ...])`` of every ``pi_{theta'_m}`` on its post-adaptation
    states, ``output_kl(y) = mean_m behaviour_kl(y_m)`` (the same operations as `model_kl`)."""

    def one_model(meta_params: Tree, pre_m: TaskData, post_m: TaskData) -> tuple[Tensor, Tensor]:
        distribution = policy_distribution(inner.policy, adapt(meta_params, pre_m, inner), post_m.obs)
        return distribution.mean, distribution.log_std

    def outputs(meta_params: Tree) -> tuple[Tensor, Tensor]:
        return vmap(one_model, in_dims=(None, 0, 0))(meta_params, pre, post)

    def output_kl(distribution_params: tuple[Tensor, Tensor]) -> Tensor:
        return vmap(behaviour_kl)(behaviour, *distribution_params, post.valid).mean()

    return outputs, output_kl


def meta_update(meta_params: Tree, pre: TaskData, post: TaskData, adapted_params: Tree, inner: InnerLoop,
                fisher_product: str = "exact", **trpo_options: Any) -> tuple[Tree, TRPOInfo]:
    """The outer TRPO step on ``mean_m L_m`` with ``mean_m KL_m <= max_kl``; ``adapted_params`` (leading ``[M]``)
    collected ``post``. ``fisher_product``: ``"exact"`` (the Hessian-vector product of ``KL``) or ``"gauss-newton"``
    (``J^T H J v`` through `meta_kl_outputs`); ``trpo_options`` go to `trpo_step`."""
    behaviour = behaviour_of(inner.policy, adapted_params, post)
    meta_loss, meta_kl = meta_objectives(pre, post, behaviour, inner)
    if fisher_product == "gauss-newton":
        outputs_fn, output_kl_fn = meta_kl_outputs(pre, post, behaviour, inner)
        trpo_options = {**trpo_options, "hvp_mode": "gauss-newton", "outputs_fn": outputs_fn,
                        "output_kl_fn": output_kl_fn}
    elif fisher_product != "exact":
        raise ValueError(f"`fisher_product` must be one of {list(FISHER_PRODUCTS)}; got {fisher_product!r}")
    return trpo_step(meta_loss, meta_kl, meta_params, loss_and_kl_fn=meta_loss_and_kl(pre, post, behaviour, inner),
                     **trpo_options)


def shaping_penalty(policy: nn.Module, params: Tree, norm_obs: Tensor, valid: Tensor, penalty: AttentionPenalty,
                    *, per_model: bool) -> Tensor:
    """``alpha (alpha_x ||J(s_t)||^2 + alpha_t ||(mu(s_t) - mu(s_t-1)) / dt||^2)`` per step, ``[M, T, N]``, of
    the policy at ``params`` (leading ``[M]`` when ``per_model``) on ``norm_obs [M, T, N, D]``; detached."""

    def one_model(model_params: Tree, model_obs: Tensor, model_valid: Tensor) -> Tensor:
        return attention_terms(policy, model_params, model_obs, model_valid, penalty, reduce=False).total

    with torch.no_grad():
        return penalty.weight * vmap(one_model, in_dims=(0 if per_model else None, 0, 0))(params, norm_obs, valid)


def model_data(imagined: Imagined, obs_mean: Tensor, obs_std: Tensor, gamma: float, gae_lambda: float,
               reward_penalty: Tensor | None = None) -> TaskData:
    """Per-model `TaskData` ``[M, T, N, ...]`` from an imagined batch ``[T, M, N, ...]``: normalised states and
    standardised GAE advantages over a linear baseline fitted per model (one vmap), from the rewards
    minus ``reward_penalty [M, T, N]`` when given."""
    per_model = [x.transpose(0, 1) for x in (imagined.obs, imagined.actions, imagined.rewards, imagined.next_obs,
                                              imagined.valid)]
    obs, actions, rewards, next_obs, valid = per_model
    if reward_penalty is not None:
        rewards = rewards - reward_penalty * valid
    horizon = rewards.shape[1]
    time = torch.arange(horizon, device=rewards.device)[None, :, None].expand_as(rewards)
    norm_obs, norm_next_obs = normalise(obs, obs_mean, obs_std), normalise(next_obs, obs_mean, obs_std)
    episodes = TaskEpisodes(norm_obs, actions, rewards, norm_next_obs, valid, time)
    advantages = vmap(standardized_advantages, in_dims=(0, None, None))(episodes, gamma, gae_lambda)
    return TaskData(norm_obs, actions, advantages, valid)


def imagine_models(ensemble: ProbabilisticEnsemble, policy: nn.Module, params: Tree, start_states: Tensor,
                   horizon: int, reward_fn: Callable[..., Tensor], termination_fn: Callable[..., Tensor] | None,
                   obs_mean: Tensor, obs_std: Tensor, generator: torch.Generator, *, per_model: bool,
                   action_bounds: tuple[Tensor, Tensor] | None = None,
                   state_bounds: tuple[Tensor, Tensor] | None = None, model_noise: bool = True) -> Imagined:
    """Rollouts of the policy at ``params`` (one tree, or one per elite when ``per_model``) in each elite model
    from ``start_states [M, N, D]``, scored by the task's analytic ``reward_fn``; no gradients.

    Each step is ``s' = clip(s + delta_m(s, clip(a, a_low, a_high)), s_low, s_high)``, with ``delta_m`` a
    sample of elite ``m``'s Gaussian (its mean unless ``model_noise``), and ``r = reward_fn(s, clip(a), s')``.
    ``action_bounds = (a_low, a_high)`` (each ``[A]``) is the clipping the real env applies (`make_env`),
    while ``actions`` and ``log_probs`` keep the Gaussian sample; ``state_bounds = (s_low, s_high)`` (each
    ``[D]``) keeps a diverging model inside a box around the real data. Either None: no clipping."""

    def action_distribution(obs: Tensor) -> DiagGaussian:
        norm_obs = normalise(obs, obs_mean, obs_std)
        if not per_model:
            return policy_distribution(policy, params, norm_obs)

        def mean_and_log_std(model_params: Tree, model_obs: Tensor) -> tuple[Tensor, Tensor]:
            distribution = policy_distribution(policy, model_params, model_obs)
            return distribution.mean, distribution.log_std

        return DiagGaussian(*vmap(mean_and_log_std)(params, norm_obs))

    def applied(act: Tensor) -> Tensor:
        return act if action_bounds is None else act.clamp(*action_bounds)

    with torch.no_grad():
        predict = ensemble.member_predictor(deterministic=not model_noise)

    def dynamics(obs: Tensor, act: Tensor, *, generator: torch.Generator | None) -> Any:
        prediction = predict(obs, applied(act), generator=generator)
        if state_bounds is None:
            return prediction
        return prediction._replace(next_obs=prediction.next_obs.clamp(*state_bounds))

    def reward(obs: Tensor, act: Tensor, next_obs: Tensor) -> Tensor:
        return reward_fn(obs, applied(act), next_obs)

    terminated = None if termination_fn is None else (lambda obs, act, next_obs: termination_fn(next_obs))
    with torch.no_grad():
        return imagine(dynamics, action_distribution, start_states, horizon, reward, termination_fn=terminated,
                       generator=generator)


def make_env(name: str, horizon: int, perturbation: str | None = None) -> EnergyMeter:
    """Gymnasium's v5 task ``name`` cut at ``horizon``, optionally perturbed (`OOD_PERTURBATIONS`), metered.

    Actions are clipped to the action space before the env sees them, so the control cost is that of the
    applied (clipped) action, as in MB-MPO's rllab envs; the unclipped Gaussian sample is what is recorded."""
    env = gym.wrappers.ClipAction(gym.make(ENV_IDS[name], max_episode_steps=horizon))
    if perturbation == "mass":
        env = perturb_env(env, "mass", scale=1.5)
    elif perturbation == "crippled-joint":
        env = perturb_env(env, "crippled-joint", joint=CRIPPLED_JOINTS[name])
    elif perturbation == "slope":
        env = perturb_env(env, "slope", degrees=10.0)
    return EnergyMeter(env)


class RealBatch(NamedTuple):
    """Real episodes of one policy: ``episodes`` (``Trajectories`` ``[T, B]``) and the work of each, ``energy [B]``."""

    episodes: Trajectories
    energy: Tensor


def collect_real(env_name: str, horizon: int, policy_fn: Callable[[Tensor], tuple[Tensor, None]], episodes: int,
                 seed: int, perturbation: str | None = None) -> RealBatch:
    """``episodes`` real episodes of ``policy_fn`` (raw observations in, actions out), one sub-env each."""
    envs = gym.vector.SyncVectorEnv([functools.partial(make_env, env_name, horizon, perturbation)] * episodes,
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        batch = collect_episodes(envs, policy_fn, episodes, horizon=horizon, seed=seed)
        energy = torch.tensor([meter.round_energies[0] for meter in envs.envs])
    finally:
        envs.close()
    return RealBatch(batch, energy)


@dataclasses.dataclass
class MBMPOConfig(TRPOSettings, RunConfig):
    """MB-MPO with the minimum attention penalty; defaults after MB-MPO and MBPO (see anchors)."""

    env: str = "halfcheetah"
    """halfcheetah, hopper or walker2d (Gymnasium v5, plain task)."""
    iterations: int = 25
    """Iterations: with the defaults, 5000 + 25 x 4000 = 105k real steps."""
    horizon: int = 200
    """Steps per real episode (returns are over this horizon)."""
    attention_weight: float = 0.0
    """alpha, the weight of the minimum attention penalty (0: plain MB-MPO)."""
    spatial_weight: float = 1.0
    """alpha_x: the weight of mean ||d mu / d s||_F^2, s the normalised state (per Jacobian entry^2)."""
    temporal_weight: float = 0.01
    """alpha_t: the weight of mean ||(mu(s_t+1) - mu(s_t)) / dt||^2, in (action units / s)^-2, dt = env dt."""
    penalty_as_reward: bool = False
    """Subtract the per-step penalty from the imagined rewards instead of adding it to the losses."""
    initial_random_steps: int = 5000
    """Real steps (at least) of uniform random actions before the first model fit, in episodes of the horizon."""
    episodes_per_model: int = 4
    """Real episodes collected by each elite's adapted policy per iteration."""
    meta_steps: int = 30
    """Meta-steps (imagine, adapt, imagine, TRPO) per iteration."""
    imagined_trajectories: int = 50
    """Imagined trajectories per model, before and again after adaptation."""
    imagined_horizon: int = 0
    """Steps per imagined trajectory; 0 means horizon."""
    model_noise: bool = False
    """Sample each imagined step from the elite's Gaussian; False steps its mean (MB-MPO's members are
    deterministic). Sampled 200-step rollouts were measured to diverge (|s| to 3.6e3, returns to 3.6e7)."""
    state_margin: float = 0.5
    """Imagined states are clipped per dimension to ``[lo - m (hi - lo), hi + m (hi - lo)]``, ``lo``/``hi`` the
    range of the real observations so far; ``inf`` disables."""
    inner_lr: float = 0.1
    """beta, the inner SGD step size (on standardised advantages; 0.001 was measured to move the policy by a
    KL below 1e-5, 0.1 by about 1e-3, improving every model's imagined return)."""
    inner_steps: int = 1
    """Inner SGD steps."""
    first_order: bool = False
    """Treat the inner gradients as constants."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 1.0
    """GAE lambda."""
    hidden: tuple[int, ...] = (32, 32)
    """Hidden sizes of the policy's tanh MLP mean."""
    init_log_std: float = -0.5
    """Initial log standard deviation of the policy (std 0.61; at std 1 the clipped exploration noise alone
    costs about 60 per 200-step HalfCheetah episode)."""
    ensemble_size: int = 7
    """Dynamics models in the ensemble."""
    num_elites: int = 5
    """Elite models (lowest holdout loss); they are MB-MPO's tasks."""
    model_hidden: tuple[int, ...] = (200, 200, 200, 200)
    """Hidden sizes of each dynamics model (SiLU)."""
    model_max_epochs: int = 50
    """Most epochs per ensemble fit (early stopping after 5 epochs without 1% holdout improvement)."""
    model_batch_size: int = 256
    """Minibatch size of the ensemble fit."""
    model_lr: float = 1e-3
    """Adam learning rate of the ensemble fit."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    fisher_product: str = "gauss-newton"
    """TRPO's Fisher-vector products ``F v``, ``F`` the Hessian of the meta-KL at theta_old: ``"gauss-newton"``,
    ``J^T H J v`` with ``J`` the Jacobian of the adapted policies' ``(mean, log_std)`` and ``H`` the KL's Hessian in
    their space (`meta_kl_outputs`); ``"exact"``, the meta-KL's Hessian-vector product (reverse-over-reverse through
    the inner step: third-order derivatives, fourth with the penalty in the inner loss). The same matrix at
    theta_old (products 5e-9 to 5e-8 apart in float32), one order of differentiation fewer: the Fisher products
    of a first reproduction iteration take 80 instead of 160 CPU s at alpha 0.05 and 10 instead of 14 at alpha 0.
    Runs whose config predates this field resume with this default."""

    def validate(self) -> None:
        super().validate()
        if self.env not in ENV_IDS:
            raise ValueError(f"`env` must be one of {list(ENV_IDS)}; got {self.env!r}")
        if self.fisher_product not in FISHER_PRODUCTS:
            raise ValueError(f"`fisher_product` must be one of {list(FISHER_PRODUCTS)}; got {self.fisher_product!r}")
        positive = ("horizon", "episodes_per_model", "meta_steps", "imagined_trajectories", "inner_steps",
                    "ensemble_size", "num_elites", "model_max_epochs", "model_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        for name in ("initial_random_steps", "imagined_horizon", "threads", "attention_weight", "spatial_weight",
                     "temporal_weight", "state_margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)}")
        for name in ("inner_lr", "model_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0; got {getattr(self, name)}")
        if self.num_elites > self.ensemble_size:
            raise ValueError(f"`num_elites` ({self.num_elites}) must not exceed `ensemble_size` ({self.ensemble_size})")
        if self.initial_random_steps < self.horizon:
            raise ValueError(f"`initial_random_steps` must be >= horizon ({self.horizon}) to give a first episode; "
                             f"got {self.initial_random_steps}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must lie in [0, 1]; got {getattr(self, name)}")
        for name in ("hidden", "model_hidden"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be one or more sizes >= 1; got {getattr(self, name)}")


def _check_int(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"`{name}` must be an int >= {least}; got {value!r}")


@register("mbmpo")
class MBMPO(Learner):
    """Minimum-attention MB-MPO (MB-MPO with attention_weight 0) on HalfCheetah, Hopper and Walker2d."""

    Config = MBMPOConfig
    envs = tuple(ENV_IDS)

    @staticmethod
    def plot_runs(run_dirs: list[Path], out_dir: Path, *, x_max: float | None = None) -> list[Path]:
        """`bilevel.algorithms.mbmpo_analysis.plot_mbmpo` (alpha sweep, adaptation curves, Jacobian heatmaps),
        for ``bilevel plot``."""
        from bilevel.algorithms.mbmpo_analysis import plot_mbmpo

        return plot_mbmpo(run_dirs, out_dir, x_max=x_max)

    def __init__(self, config: MBMPOConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.config: MBMPOConfig = config
        if config.threads:
            torch.set_num_threads(config.threads)
        env = gym.make(ENV_IDS[config.env])
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        self.dt = float(env.unwrapped.dt)
        self.action_bounds = (torch.as_tensor(env.action_space.low, device=device),
                              torch.as_tensor(env.action_space.high, device=device))
        env.close()
        self.policy = GaussianMLPPolicy(obs_dim, act_dim, hidden=tuple(config.hidden),
                                        init_log_std=config.init_log_std).to(device)
        self.meta_params = tree.params_of(self.policy, detach=True)
        self.ensemble = ProbabilisticEnsemble(obs_dim, act_dim, config.ensemble_size, config.num_elites,
                                              hidden=tuple(config.model_hidden), predict_reward=False).to(device)
        self.data: dict[str, Tensor] = {
            "obs": torch.zeros(0, obs_dim), "actions": torch.zeros(0, act_dim), "next_obs": torch.zeros(0, obs_dim),
            "rewards": torch.zeros(0), "start_obs": torch.zeros(0, obs_dim)}
        self.obs_mean, self.obs_std = torch.zeros(obs_dim), torch.ones(obs_dim)
        self.last_imagined_return = float("nan")

    # ------------------------------------------------------------------ pieces

    def penalty(self) -> AttentionPenalty:
        c = self.config
        return AttentionPenalty(c.attention_weight, c.spatial_weight, c.temporal_weight, self.dt, c.penalty_as_reward)

    def inner_loop(self, steps: int | None = None) -> InnerLoop:
        c = self.config
        return InnerLoop(self.policy, c.inner_lr, c.inner_steps if steps is None else steps, self.penalty(),
                         c.first_order)

    def _seed(self, purpose: str, *extra: int) -> int:
        return derive_seed(self.config.seed, self.iteration, SEED_PURPOSES[purpose], *extra)

    def _add_real(self, batch: Trajectories) -> None:
        valid = batch.valid
        applied = batch.actions.clamp(*(bound.to(batch.actions) for bound in self.action_bounds))
        for key, value in (("obs", batch.obs), ("actions", applied), ("next_obs", batch.next_obs),
                           ("rewards", batch.rewards)):
            self.data[key] = torch.cat([self.data[key], value[valid].to(self.data[key])])
        self.data["start_obs"] = torch.cat([self.data["start_obs"], batch.obs[0][valid[0]].to(self.data["obs"])])

    def policy_fn(self, params: Tree, generator: torch.Generator | None) -> Callable[[Tensor], tuple[Tensor, None]]:
        """Real-env actions of the policy at ``params`` (the mean action when ``generator`` is None)."""

        def act(obs: Tensor) -> tuple[Tensor, None]:
            distribution = policy_distribution(self.policy, params, normalise(obs.to(self.device), self.obs_mean,
                                                                               self.obs_std))
            return (distribution.mode if generator is None else distribution.sample(generator=generator)), None

        return act

    def _imagine(self, params: Tree, start_states: Tensor, generator: torch.Generator, *, per_model: bool) -> TaskData:
        """Imagined `TaskData` ``[M, T, N, ...]``; records the mean imagined return (task reward, unshaped) in
        ``self.last_imagined_return``."""
        c = self.config
        horizon = c.imagined_horizon or c.horizon
        imagined = imagine_models(self.ensemble, self.policy, params, start_states, horizon, REWARD_FNS[c.env],
                                  TERMINATION_FNS.get(c.env), self.obs_mean, self.obs_std, generator,
                                  per_model=per_model, action_bounds=self.action_bounds,
                                  state_bounds=self.state_box(), model_noise=c.model_noise)
        self.last_imagined_return = float(imagined.rewards.sum(0).mean())
        penalty = self.penalty()
        reward_penalty = None
        if penalty.as_reward and penalty.weight:
            norm_obs = normalise(imagined.obs.transpose(0, 1), self.obs_mean, self.obs_std)
            reward_penalty = shaping_penalty(self.policy, params, norm_obs, imagined.valid.transpose(0, 1), penalty,
                                             per_model=per_model)
        return model_data(imagined, self.obs_mean, self.obs_std, c.gamma, c.gae_lambda, reward_penalty)

    def state_box(self) -> tuple[Tensor, Tensor] | None:
        """``(lo - m (hi - lo), hi + m (hi - lo))`` per dimension over the real observations, ``m`` the
        ``state_margin``; None when the margin is infinite."""
        margin = self.config.state_margin
        if math.isinf(margin):
            return None
        low, high = self.data["obs"].min(0).values, self.data["obs"].max(0).values
        span = high - low
        return (low - margin * span).to(self.device), (high + margin * span).to(self.device)

    def _start_states(self, generator: torch.Generator) -> Tensor:
        starts = self.data["start_obs"].to(self.device)
        rows = torch.randint(starts.shape[0], (self.config.imagined_trajectories,), generator=generator,
                             device=generator.device)
        return starts[rows.to(self.device)].expand(self.config.num_elites, -1, -1)

    def adapted_for_models(self, generator: torch.Generator) -> tuple[TaskData, Tree]:
        """Imagine with the meta-policy in every elite and adapt: the pre-adaptation batch and the adapted
        parameters (leading ``[M]``, detached)."""
        pre = self._imagine(self.meta_params, self._start_states(generator), generator, per_model=False)
        return pre, tree.detach(adapt_models(self.meta_params, pre, self.inner_loop()))

    def meta_step(self, generator: torch.Generator) -> dict[str, float]:
        """One meta-step; its TRPO record and the mean imagined return (200-step sum of the task reward, over
        models and trajectories) of the meta-policy (``imagined_return_pre``) and of the adapted policies
        (``imagined_return_post``)."""
        pre, adapted_params = self.adapted_for_models(generator)
        imagined_pre = self.last_imagined_return
        post = self._imagine(adapted_params, self._start_states(generator), generator, per_model=True)
        c = self.config
        self.meta_params, info = meta_update(self.meta_params, pre, post, adapted_params, self.inner_loop(),
                                             c.fisher_product, **c.trpo_options())
        return {**info.metrics(), "imagined_return_pre": imagined_pre,
                "imagined_return_post": self.last_imagined_return}

    def fit_models(self) -> dict[str, float]:
        c = self.config
        data = {k: v.to(self.device) for k, v in self.data.items()}
        result = self.ensemble.fit(data["obs"], data["actions"], data["next_obs"], data["rewards"],
                                   batch_size=c.model_batch_size, max_epochs=c.model_max_epochs,
                                   learning_rate=c.model_lr, generator=torch.Generator().manual_seed(
                                       self._seed("model")))
        std = data["obs"].std(0, unbiased=False)
        self.obs_mean, self.obs_std = data["obs"].mean(0), torch.where(std < 1e-6, torch.ones_like(std), std)
        return {"model_epochs": float(result.epochs),
                "model_holdout_mse": float(result.holdout_score[result.elite_idx].mean())}

    def smoothness(self, params: Tree, episodes: Trajectories) -> MinimumAttention:
        """Mean ``||d mu / d s||^2`` and ``||(mu(s_t+1) - mu(s_t)) / dt||^2`` of the policy at ``params`` on the
        states of real ``episodes``, unweighted."""
        norm_obs = normalise(episodes.obs.to(self.device), self.obs_mean, self.obs_std)
        unweighted = self.penalty()._replace(spatial_weight=1.0, temporal_weight=1.0)
        with torch.no_grad():
            return attention_terms(self.policy, params, norm_obs, episodes.valid.to(self.device), unweighted)

    # ------------------------------------------------------------------ Learner

    def step(self) -> dict[str, float]:
        c = self.config
        metrics: dict[str, float] = {}
        if self.iteration == 0:
            random_batches = self._random_episodes()
            for batch in random_batches:
                self._add_real(batch)
                self.env_steps += int(batch.valid.sum())
            metrics["random_return"] = float(torch.cat([b.episode_returns for b in random_batches]).mean())
        metrics.update(self.fit_models())
        generator = torch.Generator(self.device).manual_seed(self._seed("imagine"))
        trpo_rows = [self.meta_step(generator) for _ in range(c.meta_steps)]
        metrics.update({k: float(np.mean([row[k] for row in trpo_rows])) for k in trpo_rows[0]})
        metrics.update({f"{k}_first": trpo_rows[0][k] for k in ("imagined_return_pre", "imagined_return_post")})
        metrics.update({f"{k}_last": trpo_rows[-1][k] for k in ("imagined_return_pre", "imagined_return_post")})
        metrics["policy_log_std"] = float(self.meta_params["log_std"].mean())

        _, adapted_params = self.adapted_for_models(generator)
        action_generator = torch.Generator(self.device).manual_seed(self._seed("real"))
        returns, energies, spatial, temporal = [], [], [], []
        for model in range(c.num_elites):
            model_params = tree.map(lambda leaf, m=model: leaf[m], adapted_params)
            batch = collect_real(c.env, c.horizon, self.policy_fn(model_params, action_generator),
                                 c.episodes_per_model, self._seed("real_envs", model))
            self._add_real(batch.episodes)
            self.env_steps += int(batch.episodes.valid.sum())
            terms = self.smoothness(model_params, batch.episodes)
            returns.append(batch.episodes.episode_returns)
            energies.append(batch.energy)
            spatial.append(float(terms.spatial))
            temporal.append(float(terms.temporal))
        return {"return": float(torch.cat(returns).mean()), "jacobian_sq": float(np.mean(spatial)),
                "jerk_sq": float(np.mean(temporal)), "energy": float(torch.cat(energies).mean()), **metrics}

    def _random_episodes(self) -> list[Trajectories]:
        """Batches of ``ceil(initial_random_steps / horizon)`` episodes of uniform random actions, until they
        hold ``initial_random_steps`` real steps: one batch where episodes run to the horizon (HalfCheetah),
        more where they end early (Hopper, Walker2d: a random walker falls within tens of steps)."""
        c = self.config
        episodes = math.ceil(c.initial_random_steps / c.horizon)
        generator = torch.Generator().manual_seed(self._seed("random"))
        act_dim = self.data["actions"].shape[1]

        def uniform(obs: Tensor) -> tuple[Tensor, None]:
            return torch.rand(obs.shape[0], act_dim, generator=generator) * 2 - 1, None

        batches: list[Trajectories] = []
        while sum(int(batch.valid.sum()) for batch in batches) < c.initial_random_steps:
            seed = self._seed("random", len(batches)) if batches else self._seed("random")
            batches.append(collect_real(c.env, c.horizon, uniform, episodes, seed).episodes)
        return batches

    def evaluate(self, perturb: str | None = None, episodes: int = 5, adaptation_episodes: int = 5,
                 adaptation_steps: int = 3, seed: int = 0, adaptation_lr: float | None = None) -> dict[str, float]:
        """Meta-test on real (optionally perturbed) dynamics: adapt the meta-policy with real episodes.

        Round ``k = 0 .. adaptation_steps``: ``episodes`` mean-action episodes of the current policy are
        scored (``return_k``, ``energy_k``, ``jacobian_sq_k``, ``jerk_sq_k``); then, unless it is the last
        round, ``adaptation_episodes`` stochastic episodes are collected and one inner step (the training
        inner loss, penalty included) adapts the policy on them. ``samples_k`` counts the real steps of
        adaptation data used before round ``k``. ``perturb``: None, mass (+50%), crippled-joint or slope
        (10 degrees). ``adaptation_lr``: the real-data inner step's size (default: the training one,
        ``inner_lr``)."""
        if perturb is not None and perturb not in OOD_PERTURBATIONS:
            raise ValueError(f"`perturb` must be one of {list(OOD_PERTURBATIONS)} or None; got {perturb!r}")
        for name, value, least in (("episodes", episodes, 1), ("adaptation_episodes", adaptation_episodes, 1),
                                   ("adaptation_steps", adaptation_steps, 0), ("seed", seed, 0)):
            _check_int(name, value, least)
        if adaptation_lr is not None and (isinstance(adaptation_lr, bool) or not isinstance(adaptation_lr, (int, float))
                                          or not adaptation_lr > 0):
            raise ValueError(f"`adaptation_lr` must be a number > 0; got {adaptation_lr!r}")
        c = self.config
        inner_loop = self.inner_loop(steps=1)
        if adaptation_lr is not None:
            inner_loop = inner_loop._replace(lr=float(adaptation_lr))
        generator = torch.Generator(self.device).manual_seed(derive_seed(c.seed, seed, 7_919))
        params, samples = self.meta_params, 0
        result: dict[str, float] = {"horizon": float(c.horizon), "attention_weight": c.attention_weight,
                                    "adaptation_lr": inner_loop.lr}
        for round_index in range(adaptation_steps + 1):
            scored = collect_real(c.env, c.horizon, self.policy_fn(params, None), episodes,
                                  derive_seed(seed, round_index, 0), perturb)
            terms = self.smoothness(params, scored.episodes)
            result.update({f"return_{round_index}": float(scored.episodes.episode_returns.mean()),
                           f"energy_{round_index}": float(scored.energy.mean()),
                           f"jacobian_sq_{round_index}": float(terms.spatial),
                           f"jerk_sq_{round_index}": float(terms.temporal),
                           f"samples_{round_index}": float(samples)})
            if round_index == adaptation_steps:
                break
            batch = collect_real(c.env, c.horizon, self.policy_fn(params, generator), adaptation_episodes,
                                 derive_seed(seed, round_index, 1), perturb).episodes
            samples += int(batch.valid.sum())
            params = tree.detach(adapt(params, self.real_data(params, batch), inner_loop))
        return result

    def real_data(self, params: Tree, batch: Trajectories) -> TaskData:
        """`TaskData` ``[T, B, ...]`` of real episodes collected by the policy at ``params`` (advantages and
        reward shaping as for imagined ones)."""
        horizon = batch.rewards.shape[0]
        time = torch.arange(horizon)[:, None].expand_as(batch.rewards)
        norm_obs = normalise(batch.obs.to(self.device), self.obs_mean, self.obs_std)
        norm_next_obs = normalise(batch.next_obs.to(self.device), self.obs_mean, self.obs_std)
        rewards, valid = batch.rewards.to(self.device), batch.valid.to(self.device)
        penalty = self.penalty()
        if penalty.as_reward and penalty.weight:
            rewards = rewards - shaping_penalty(self.policy, params, norm_obs[None], valid[None], penalty,
                                                per_model=False)[0] * valid
        episodes = TaskEpisodes(norm_obs, batch.actions.to(self.device), rewards, norm_next_obs, valid,
                                time.to(self.device))
        advantages = standardized_advantages(episodes, self.config.gamma, self.config.gae_lambda)
        return TaskData(norm_obs, episodes.actions, advantages, valid)

    def learner_state(self) -> dict[str, Any]:
        return {"meta_params": tree.map(torch.clone, self.meta_params), "ensemble": self.ensemble.state_dict(),
                "data": {k: v.clone() for k, v in self.data.items()}, "obs_mean": self.obs_mean.clone(),
                "obs_std": self.obs_std.clone()}

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.load_evaluation_state(state)
        self.ensemble.load_state_dict(state["ensemble"])
        self.data = {k: v.clone() for k, v in state["data"].items()}

    def evaluation_state(self) -> dict[str, Any]:
        """The meta-policy and the observation normaliser: all that `evaluate` reads (about 10 kB)."""
        return {"meta_params": tree.map(torch.clone, self.meta_params), "obs_mean": self.obs_mean.clone(),
                "obs_std": self.obs_std.clone()}

    def load_evaluation_state(self, state: dict[str, Any]) -> None:
        tree.check_same_structure(state["meta_params"], self.meta_params, ("saved meta_params", "meta_params"))
        self.meta_params = tree.map(lambda saved: saved.to(self.device), state["meta_params"])
        self.obs_mean, self.obs_std = state["obs_mean"].to(self.device), state["obs_std"].to(self.device)
