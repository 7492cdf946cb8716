#!/bin/sh
# An evaluator for `expo search`, after the ExPO paper: generate answers to a dev set with
# vLLM, score them with a reward model, print the mean reward as the last line of stdout.
#
#   expo search --sft SFT --aligned DPO --run runs/x -j 4 \
#     --eval 'CUDA_VISIBLE_DEVICES={slot} examples/eval-vllm-reward.sh {output} {workdir}'
#
# Arguments: the candidate checkpoint and a scratch directory of its own. Adapt the
# settings below; keep the contract:
#   exit 0 + the score as the last stdout line; exit 125 when this candidate cannot be
#   evaluated (e.g. it generates garbage), anything else for a failure worth retrying.
#
# Needs: python3 with vllm, transformers and torch. Not run in CI.
set -eu

MODEL=${1:?usage: eval-vllm-reward.sh CHECKPOINT WORKDIR}
WORK=${2:?usage: eval-vllm-reward.sh CHECKPOINT WORKDIR}
# A dev split, one JSON object per line with a "prompt" field. Search on a dev split and
# report on a held-out benchmark.
PROMPTS=${EXPO_PROMPTS:-dev_prompts.jsonl}
REWARD_MODEL=${EXPO_REWARD_MODEL:-RLHFlow/ArmoRM-Llama3-8B-v0.1}
MAX_TOKENS=${EXPO_MAX_TOKENS:-1024}

# Everything but the score goes to stderr (RUN/trials/N/stderr.log).
python3 - "$MODEL" "$WORK" "$PROMPTS" "$REWARD_MODEL" "$MAX_TOKENS" >&2 <<'PY'
import json, sys
model, work, prompts_path, reward_name, max_tokens = sys.argv[1:6]
prompts = [json.loads(l)["prompt"] for l in open(prompts_path) if l.strip()]

from vllm import LLM, SamplingParams
llm = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=0.85)
tok = llm.get_tokenizer()
chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                 add_generation_prompt=True) for p in prompts]
outs = llm.generate(chats, SamplingParams(temperature=0.0, max_tokens=int(max_tokens)))
answers = [o.outputs[0].text for o in outs]
del llm  # free the GPU for the reward model

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
rtok = AutoTokenizer.from_pretrained(reward_name)
rm = AutoModelForSequenceClassification.from_pretrained(
    reward_name, torch_dtype=torch.bfloat16, device_map="cuda", trust_remote_code=True)
rewards = []
with torch.no_grad():
    for p, a in zip(prompts, answers):
        ids = rtok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
            return_tensors="pt").to("cuda")
        out = rm(ids)
        score = getattr(out, "score", None)
        rewards.append(float((score if score is not None else out.logits)[0].flatten()[0]))

with open(f"{work}/rewards.jsonl", "w") as f:
    for p, a, r in zip(prompts, answers, rewards):
        f.write(json.dumps({"prompt": p, "answer": a, "reward": r}) + "\n")
mean_len = sum(len(a) for a in answers) / max(len(answers), 1)
json.dump({"reward": sum(rewards) / len(rewards), "mean_answer_chars": mean_len},
          open(f"{work}/score.json", "w"))
PY

# The score: the last line of stdout, one number. (For the JSON instead, print
# "$WORK/score.json" and pass --score-json /reward.)
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["reward"])' "$WORK/score.json"
