"""MuJoCo's C warnings reach Python's warnings machinery instead of stderr."""

import warnings

import gymnasium as gym
import mujoco

import bilevel.envs  # noqa: F401  (installs the handler)
from bilevel.envs import MujocoWarning, forward_mujoco_warnings


def test_a_deprecated_xml_attribute_warns_through_python_and_an_error_filter_cannot_abort(capfd):
    assert forward_mujoco_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym.make("HalfCheetah-v5").close()
    assert any(issubclass(w.category, MujocoWarning) and "settotalmass" in str(w.message) for w in caught)
    assert "settotalmass" not in capfd.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error", MujocoWarning)
        gym.make("HalfCheetah-v5").close()
    assert "MujocoWarning (an error filter matched" in capfd.readouterr().err


def test_a_users_own_handler_is_kept():
    previous = mujoco.get_mju_user_warning()
    seen = []
    mujoco.set_mju_user_warning(seen.append)
    try:
        assert not forward_mujoco_warnings()
        gym.make("HalfCheetah-v5").close()
        assert any("settotalmass" in message for message in seen)
    finally:
        mujoco.set_mju_user_warning(previous)
