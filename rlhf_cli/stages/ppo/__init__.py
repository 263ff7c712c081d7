"""PPO with actor, critic, reference and reward arranged on one or more bases."""
