import gymnasium as gym
import numpy as np
import pytest

from bilevel.envs import BodyMassScale, CrippledJoint, FrictionScale, Slope, perturb


def final_obs(env: gym.Env, actions: np.ndarray) -> np.ndarray:
    obs, _ = env.reset(seed=0)
    for action in actions:
        obs, *_ = env.step(action)
    return obs


@pytest.fixture
def actions(rng) -> np.ndarray:
    return rng.uniform(-1, 1, size=(20, 6))


@pytest.fixture
def unperturbed(actions) -> np.ndarray:
    return final_obs(gym.make("HalfCheetah-v5"), actions)


def test_mass_scale_edits_body_mass_and_inertia_and_changes_dynamics(actions, unperturbed):
    base = gym.make("HalfCheetah-v5").unwrapped.model
    env = perturb(gym.make("HalfCheetah-v5"), "mass", scale=1.5, bodies=["torso", 2])
    model = env.unwrapped.model
    np.testing.assert_allclose(model.body_mass[[1, 2]], 1.5 * base.body_mass[[1, 2]])
    np.testing.assert_allclose(model.body_inertia[[1, 2]], 1.5 * base.body_inertia[[1, 2]])
    np.testing.assert_array_equal(model.body_mass[3:], base.body_mass[3:])
    assert not np.allclose(final_obs(env, actions), unperturbed)


def test_mass_scale_defaults_to_every_body_but_the_world():
    base = gym.make("HalfCheetah-v5").unwrapped.model
    model = BodyMassScale(gym.make("HalfCheetah-v5"), 0.5).unwrapped.model
    np.testing.assert_allclose(model.body_mass, 0.5 * base.body_mass)
    np.testing.assert_allclose(model.body_subtreemass[0], 0.5 * base.body_subtreemass[0])


@pytest.mark.parametrize("joint", ["bthigh", 0, ["bthigh"]])
def test_crippled_joint_zeroes_the_gear_and_ignores_its_control(joint, actions, unperturbed):
    env = CrippledJoint(gym.make("HalfCheetah-v5"), joint)
    model = env.unwrapped.model
    assert env.actuator_ids == [0]
    np.testing.assert_array_equal(model.actuator_gear[0], 0.0)
    assert (model.actuator_gear[1:, 0] > 0).all()
    other_first_controls = actions.copy()
    other_first_controls[:, 0] = -actions[:, 0]
    crippled = final_obs(env, actions)
    np.testing.assert_array_equal(crippled, final_obs(env, other_first_controls))
    assert not np.allclose(crippled, unperturbed)


def test_crippled_joint_by_joint_name_on_ant():
    env = CrippledJoint(gym.make("Ant-v5"), ["hip_1", "ankle_1"])
    gear = env.unwrapped.model.actuator_gear[:, 0]
    assert env.actuator_ids == sorted(np.flatnonzero(gear == 0).tolist())
    assert len(env.actuator_ids) == 2


def test_slope_rotates_gravity_in_the_xz_plane(actions, unperturbed):
    env = Slope(gym.make("HalfCheetah-v5"), 10.0)
    gravity = env.unwrapped.model.opt.gravity
    np.testing.assert_allclose(np.linalg.norm(gravity), 9.81)
    np.testing.assert_allclose(gravity, 9.81 * np.array([-np.sin(np.radians(10)), 0.0, -np.cos(np.radians(10))]))
    assert not np.allclose(final_obs(env, actions), unperturbed)


def test_friction_scale_edits_every_geom_friction(actions, unperturbed):
    base = gym.make("HalfCheetah-v5").unwrapped.model
    env = FrictionScale(gym.make("HalfCheetah-v5"), 0.2)
    np.testing.assert_allclose(env.unwrapped.model.geom_friction, 0.2 * base.geom_friction)
    assert not np.allclose(final_obs(env, actions), unperturbed)


def test_perturbation_persists_through_reset():
    env = perturb(gym.make("HalfCheetah-v5"), "friction", scale=3.0)
    before = env.unwrapped.model.geom_friction.copy()
    env.reset(seed=1)
    np.testing.assert_array_equal(env.unwrapped.model.geom_friction, before)


@pytest.mark.parametrize(
    ("name", "kwargs", "bad_value"),
    [
        ("mass", {"scale": 0.0}, "0.0"),
        ("mass", {"scale": 1.0, "bodies": ["tail"]}, "'tail'"),
        ("friction", {"scale": -1.0}, "-1.0"),
        ("crippled-joint", {"joint": "knee"}, "'knee'"),
        ("crippled-joint", {"joint": 6}, "6"),
        ("slope", {"degrees": 90.0}, "90.0"),
        ("mass", {"scale": float("inf")}, "inf"),
        ("mass", {"scale": 2.0, "bodies": []}, "no body chosen"),
        ("mass", {"scale": 2.0, "bodies": [2.5]}, "2.5"),
        ("crippled-joint", {"joint": []}, "cripples nothing"),
    ],
)
def test_bad_perturbation_arguments_name_the_value(name, kwargs, bad_value):
    with pytest.raises(ValueError, match=bad_value):
        perturb(gym.make("HalfCheetah-v5"), name, **kwargs)


def test_unknown_perturbation_names_the_value():
    with pytest.raises(ValueError, match=r"'wind'.*crippled-joint"):
        perturb(gym.make("HalfCheetah-v5"), "wind")


def test_non_mujoco_env_is_rejected():
    with pytest.raises(ValueError, match="not a MuJoCo env"):
        Slope(gym.make("bilevel/Navigation2D-v0"), 5.0)


def test_numpy_integers_select_bodies_and_actuators_like_ints():
    env = gym.make("HalfCheetah-v5")
    assert BodyMassScale(env, 1.0, bodies=[np.int64(2)]).body_ids == [2]
    assert CrippledJoint(env, np.int64(1)).actuator_ids == CrippledJoint(env, 1).actuator_ids == [1]
