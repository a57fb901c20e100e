"""The RL loop without Lightning: generation (own KV loop or vLLM), reward sources, PPO experience and update."""
