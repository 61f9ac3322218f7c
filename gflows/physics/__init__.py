"""Lattice phi^4: action, presets, reweighting, Markov chains."""

from gflows.physics.mcmc import binned_jackknife, ess, hmc, independence_mh, tau_int
from gflows.physics.phi4 import PRESETS, Phi4, from_hopping, to_hopping

__all__ = ["PRESETS", "Phi4", "binned_jackknife", "ess", "from_hopping", "hmc", "independence_mh",
           "tau_int", "to_hopping"]
