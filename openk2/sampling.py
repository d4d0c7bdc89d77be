"""Sampling defaults, each named once: what openk2 samples with where nobody says otherwise.

The engine's own default is the model's argmax (`SamplingParams()`); each command that talks to a
person or answers an API picks its defaults here, for the reason written beside them. No torch: the
command line's parsers, the agent and the tool worlds read this too. tests/test_layout.py keeps
temperature, top-p and top-k numbers out of every other module.
"""

# temperature
GREEDY = 0.0  # the argmax, reproducible: SamplingParams, `openk2 generate`, evaluations, the LLM judge
K2_TEMPERATURE = 0.6  # Moonshot's recommended temperature for K2 (K2-SPEC §6.4): `openk2 chat`, `agent`
API_TEMPERATURE = 1.0  # OpenAI's default, for a request to `openk2 serve` that gives none
RL_TEMPERATURE = 1.0  # RL rollouts start at the policy's own distribution (exploration) ...
RL_TEMPERATURE_END = K2_TEMPERATURE  # ... and decay to where the model is used (K2's temperature decay)
RL_RECIPE_TEMPERATURE = 0.8  # the measured RL recipe (rl/config.RL_RECIPE): at 1.0 a small policy's
RL_RECIPE_TEMPERATURE_END = 0.5  # rollouts succeed at half its greedy rate (README, "RL")
WRITER_TEMPERATURE = 1.0  # the LLM task writer of `openk2 synth --tools/--mcp`: varied tasks

# truncation
TOP_P_OFF = 1.0  # the whole distribution
TOP_K_OFF = 0
CHAT_TOP_P = 0.95  # `openk2 chat`: drops the long tail of unlikely tokens a reader would see as noise

# reply length, where the request gives none
MAX_TOKENS = 32  # SamplingParams, `openk2 generate`
CHAT_MAX_TOKENS = 512  # one reply of `openk2 chat` (less where the context has less room)
API_MAX_TOKENS = 1024  # `openk2 serve` (less where the context has less room)
