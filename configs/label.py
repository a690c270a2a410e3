"""Pseudo-labelling: `python -m data.label --config=configs/label.py[:arg] [--shard=i/N]`.

  python -m data.label --config=configs/label.py:benchmark=nextqa,split=train \
      --config.label.root=/data/nextqa --config.label.openai.base_url=http://host:8000/v1 \
      --config.label.openai.model=Qwen/Qwen2-VL-7B-Instruct \
      --config.label.text_llm.base_url=http://host:8001/v1 --config.label.text_llm.model=...
  python -m data.label --config=configs/label.py:oracle          # the needle benchmark's truth
  python -m data.label merge --inputs=a.jsonl,b.jsonl --output=labels.jsonl

The server comes from label.openai.base_url / model, or $OPENAI_BASE_URL / $OPENAI_MODEL; the
API key from label.openai.api_key or $OPENAI_API_KEY, and it is never written anywhere.
"""

import ml_collections

from configs import common

# The paper's prompts: the spatial judge reasons, then answers True or False; the temporal
# text LLM lists the helpful frames of the numbered captions.
PROMPTS = {
  "spatial": (
    "{question}\n"
    "Does this video frame show information that helps answer the question? Think step by "
    "step about what the frame shows and how it relates to the question, then end with "
    "'Answer: True' or 'Answer: False'."
  ),
  "caption": (
    "Describe this video frame in one or two sentences: the people, objects, actions, "
    "scene and any visible text."
  ),
  "temporal": (
    "Below are captions of {n} frames sampled in order from a video, each with its index.\n"
    "{captions}\n\n{question}\n"
    "Which frames are the most helpful to answer the question? Reply with a JSON list of "
    "frame indices, for example [3, 17, 42]."
  ),
  "corrective": (
    "Your answer could not be read as frame indices between 0 and {last}: {problem}. Reply "
    "with only a JSON list of integers between 0 and {last}."
  ),
}


def server(base_url="", model=""):
  c = ml_collections.ConfigDict()
  c.base_url = base_url
  c.model = model
  c.api_key = ""  # "" : $OPENAI_API_KEY
  c.timeout_s = 120.0
  c.retries = 4
  c.backoff_s = 1.0
  c.concurrency = 8  # calls in flight at once
  c.top_logprobs = 10
  return c


def get_config(arg=None):
  args = common.parse_arg(arg, benchmark="needle", split="", oracle=False, backend="openai")
  c = ml_collections.ConfigDict()
  c.label = ml_collections.ConfigDict()
  c.label.benchmark = args.benchmark  # a frameselect_jax.videoqa benchmark
  c.label.root = "data/needle_benchmark" if args.benchmark == "needle" else ""
  c.label.split = args.split or ("train" if args.benchmark == "needle" else "")
  c.label.videos_dir = ""
  c.label.output = ""  # default labels/<benchmark>-<split>.jsonl
  # oracle (needle ground truth) | spatial | temporal | spatial+temporal
  c.label.kinds = "oracle" if args.oracle else "spatial+temporal"
  c.label.spatial_weight = 1.0  # combined = weighted mean of spatial and temporal
  c.label.temporal_weight = 1.0
  c.label.num_candidates = 128  # the selector's n: labels are per candidate
  c.label.image_size = 448  # frames as the multimodal LLM sees them
  c.label.decoder = "auto"
  c.label.time_limit_s = 900.0  # per item
  c.label.max_failure_fraction = 0.05  # exit non-zero above it
  c.label.progress = True
  c.label.backend = args.backend  # openai | transformers (for the multimodal LLM)
  c.label.openai = server()  # the multimodal LLM (spatial judge, captioner)
  c.label.text_llm = server()  # temporal: "" base_url: the same server and model
  c.label.transformers = ml_collections.ConfigDict()
  c.label.transformers.model_dir = ""
  c.label.transformers.device = "cpu"
  c.label.transformers.dtype = "bfloat16"
  c.label.transformers.batch_size = 8
  c.label.transformers.reasoning_tokens = 0  # >0: reason this many tokens before answering
  c.label.spatial_tokens = 256  # the judge's reasoning and answer
  c.label.caption_tokens = 96
  c.label.answer_tokens = 256
  c.label.prompts = ml_collections.ConfigDict(PROMPTS)
  c.label.oracle = ml_collections.ConfigDict()
  c.label.oracle.spatial_noise = 0.0  # std of Gaussian noise on the true relevance
  c.label.oracle.temporal_flip = 0.0  # probability of flipping each candidate
  c.label.oracle.seed = 0
  return c
