"""The project's tests: CPU-first and hermetic (tiny models and tokenizers built here, Triton
kernels under TRITON_INTERPRET=1, distributed runs under torchrun with gloo).

    pytest test_all.py                      # everything (the command CI runs)
    pytest tests/test_dpo.py -k ipo         # one module while you work on it

One module per file of the project, in reading order, all in tests/; shared fixtures and writers in
tests/helpers.py (the session-scoped ones are registered by conftest.py). What each module proves:

  test_model.py             logits = transformers' Llama/Qwen2/Qwen3, KV-cached decoding = full
                            forward, packed documents isolated
  test_attention.py         packed / cached / sliding-window attention = a dense-mask reference (and
                            transformers' Mistral), FlexAttention's block mask, checkpointing
                            changes no gradient, packed memory at T = 4096
  test_scale.py             FSDP2 meta-device init + rank-0 broadcast = a single-process load (bit
                            for bit), sharded save in bf16, bf16 LM-head log-probs under autocast
  test_memory_plan.py       FSDP/checkpointing/LoRA arithmetic, Llama-3-8B SFT 8k and DPO 2×2k fit
                            80 GiB, `--dry-run` in every stage
  test_memory_trace.py      each stage's own step on fake tensors: traced peak = real-tensor peak to
                            the byte (sft, rm, dpo, osp, LoRA, sampling), the plan within [1, 1.2] ×
                            the trace, Llama-3-8B DPO traced on 8 fake ranks fits 80 GiB
  test_lora.py              LoRA: B = 0 equals the base, only adapters train, merged = unmerged
                            (forward and cached decode), adapters off = base bit for bit, PEFT loads
                            our adapter to the same logits, LoRA SFT/RM/DPO/OSP end to end, OSP
                            under FSDP2 2 ranks = 1, under bf16 the float32 export = the source +
                            s·BA and iteration t + 1 samples from π_0 + the adapter
  test_common.py            the prompt/response token boundary, the LR schedule, atomic JSONL
  test_kernels_logprob.py   fused log-probs = the PyTorch reference (values and gradients,
                            fp32/bf16)
  test_kernels_sampling.py  top-k/top-p/min-p sampling stays in the kept set, exact log-probs,
                            per-row seeds
  test_cuda.py              on a GPU: Triton kernels = twins, cached decode in bf16, FlexAttention =
                            twin (CPU variants at tiny shapes)
  test_sft.py               SFT lowers the loss, exports to transformers, 2 ranks = 1 rank,
                            plain-text (pretraining) records train on every token
  test_train_rm.py          BT loss by hand, reward at the last real token, export + scoring,
                            pairwise symmetry
  test_reward_interop.py    a reward is read where transformers and TRL read it (ChatML, Llama-3,
                            Mistral templates; padded batches, right and left), and dpo.py scores
                            with a reward model of another tokenizer and template, or with an
                            ensemble (mean − std) of three
  test_generate.py          greedy = uncached argmax = transformers, stop tokens, seeded samples
                            independent of batch/ranks
  test_dpo.py               DPO/IPO/SPCE/cDPO by hand and against TRL's formulas, offline and online
                            runs, resume, online pairs scored as the tokens sampled (reference
                            log-probs = transformers', no stop token on a cut response), a
                            verifier in TRL's convention scores an iteration (rewards = its values)
  test_osp.py               ranked/random pairing, judge symmetry, OSP steps end to end
  test_eval_runs.py         checkpoints found, gold-scored, answers cached, each row's training
                            reward's on-policy accuracy
  test_data(_extra).py      converters on the published formats, judge templates, the validator,
                            optional fields, unreadable and empty files, `python -m data.*`
  test_task.py              the built-in task: gold scorer, splits, tokenizer, labels (and the
                            off-policy pairs' milder length bias), pretraining texts exact,
                            determinism; data/arith.py (the SmolLM2 task): answers worked out
                            again, its verifier in TRL's convention
  test_resume.py            `--save-every`: train_rm, DPO with LoRA and OSP killed after a saved
                            state and rerun end bit for bit where an uninterrupted run ends (sft.py
                            under kill -9 of one of 2 ranks: tests/test_sft.py); a smaller
                            micro-batch may resume; random streams load with weights_only (old
                            pickles: afresh)
  test_tracking.py          `--report-to tensorboard / wandb` (offline): the event file and the run
                            read back = metrics.jsonl, run name and config; a missing package stops
                            at parse time; a resume continues the wandb run and TensorBoard shows
                            each step once
  test_bench.py             `python -m bench --tiny`: every row runs and prints both sides; greedy
                            answers, log-probs or DPO losses that differ from transformers', the
                            naive computation or TRL's fail the command
  test_setup.py             no top-level name of ours shadows an installed package (and the check
                            names a clash), constraints.txt pins every requirement
  test_first_hour.py        a bad numeric flag in any stage (or in a run's config.json) stops it at
                            once, naming the flag, before any file; Ctrl-C is one line and exit 130,
                            finished chunks kept; a missing field shows an example record
"""
from tests.test_model import *  # noqa: F401,F403
from tests.test_attention import *  # noqa: F401,F403
from tests.test_scale import *  # noqa: F401,F403
from tests.test_memory_plan import *  # noqa: F401,F403
from tests.test_memory_trace import *  # noqa: F401,F403
from tests.test_lora import *  # noqa: F401,F403
from tests.test_common import *  # noqa: F401,F403
from tests.test_kernels_logprob import *  # noqa: F401,F403
from tests.test_kernels_sampling import *  # noqa: F401,F403
from tests.test_cuda import *  # noqa: F401,F403
from tests.test_sft import *  # noqa: F401,F403
from tests.test_train_rm import *  # noqa: F401,F403
from tests.test_reward_interop import *  # noqa: F401,F403
from tests.test_generate import *  # noqa: F401,F403
from tests.test_dpo import *  # noqa: F401,F403
from tests.test_osp import *  # noqa: F401,F403
from tests.test_eval_runs import *  # noqa: F401,F403
from tests.test_data import *  # noqa: F401,F403
from tests.test_task import *  # noqa: F401,F403
from tests.test_data_extra import *  # noqa: F401,F403
from tests.test_setup import *  # noqa: F401,F403
from tests.test_first_hour import *  # noqa: F401,F403
from tests.test_tracking import *  # noqa: F401,F403
from tests.test_resume import *  # noqa: F401,F403
from tests.test_bench import *  # noqa: F401,F403
