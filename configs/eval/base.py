"""The evaluation harness's shared config: `python -m eval --config=configs/eval/<benchmark>.py`.

Each benchmark's file calls `base(benchmark, ...)` and sets what differs (its root, split,
prompt template). Any field can be set on the command line, e.g.
`--config.downstream.openai.base_url=http://host:8000/v1 --config.ks=8,16,32`.
"""

import ml_collections

# The usual multiple-choice prompt of Video-MME / LLaVA-Video style evaluations (lmms-eval's
# post-prompt), and the usual short open-ended one (its ActivityNet-QA post-prompt).
MULTIPLE_CHOICE = (
  "Select the best answer to the following multiple-choice question based on the video. "
  "Respond with only the letter of the correct option.\n{question}\n{options}\n"
  "The best answer is:"
)
OPEN_ENDED = "{question}\nAnswer the question using a single word or phrase."


def server():
  c = ml_collections.ConfigDict()
  c.base_url = ""
  c.model = ""
  c.api_key = ""  # "" : $OPENAI_API_KEY; never written to the outputs
  c.timeout_s = 120.0
  c.retries = 4
  c.backoff_s = 1.0
  return c


def base(benchmark: str, root: str = "", split: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.benchmark = benchmark  # a frameselect_jax.videoqa benchmark
  c.root = root
  c.split = split  # "" : the benchmark's reported split
  c.videos_dir = ""
  c.output = f"eval_out/{benchmark}"
  c.seed = 0
  c.progress = True
  # uniform, random, pixel_diff (question-blind keyframes), top_k and nms_greedy (the
  # selector's scores), siglip_top_k, siglip_nms, bolt and aks (SigLIP question-frame
  # similarity), gens_top_k and gens_nms (GenS through a server), file:<selection file>
  c.strategies = "uniform,random,pixel_diff,top_k,nms_greedy"
  c.ks = (8, 16, 32)
  c.num_candidates = 128  # the selector's n; every strategy picks from the same candidates

  c.selector = ml_collections.ConfigDict()
  c.selector.checkpoint = ""  # a training workdir's checkpoints (or one step)
  c.selector.llm_dir = ""  # or Hugging Face directories
  c.selector.vision_dir = ""
  c.selector.random = False  # a random tiny selector (tests and demos only)

  c.decode = ml_collections.ConfigDict()
  c.decode.image_size = 448  # candidates as the downstream model gets them
  c.decode.backend = "auto"
  c.decode.workers = 2  # background decoding threads
  c.decode.prefetch = 4  # items decoded ahead

  c.downstream = ml_collections.ConfigDict()
  c.downstream.kind = "openai"  # openai | transformers | needle_reader
  c.downstream.openai = server()
  c.downstream.transformers = ml_collections.ConfigDict()
  c.downstream.transformers.model_dir = ""
  c.downstream.transformers.device = "cpu"
  c.downstream.transformers.as_video = True  # the frames as Qwen2-VL's video input
  c.downstream.template = MULTIPLE_CHOICE
  c.downstream.open_template = OPEN_ENDED
  c.downstream.number_frames = False  # draw each frame's index and time onto it
  c.downstream.max_tokens = 32
  c.downstream.concurrency = 4  # answers in flight
  c.downstream.cache = True  # answers on disk, keyed by model, prompt and frames

  c.similarity = ml_collections.ConfigDict()
  c.similarity.siglip_dir = ""  # a Hugging Face SiglipModel directory (both towers)
  c.similarity.with_options = True  # the query is the question and its options
  c.similarity.batch_size = 32  # frames per image-tower call

  c.peers = ml_collections.ConfigDict()
  c.peers.bolt_power = 3.0  # BOLT's scripts: 3 (2.5 on LongVideoBench)
  c.peers.aks_threshold = 0.8  # AKS's defaults
  c.peers.aks_depth = 5

  c.gens = server()  # GenS (a small video LLM naming relevant frames), OpenAI-compatible
  c.gens.max_tokens = 256

  c.judge = server()  # open-ended answers: an LLM judge (yes/no and 0-5)

  c.report = ml_collections.ConfigDict()
  c.report.baseline = "uniform"  # paired comparisons against it, at the same k
  c.report.resamples = 10000
  return c
