"""Talks to `refusal-steer serve` through the official `openai` package and checks what comes
back: chat (whole and streamed), completions, logprobs, n, stop, a recipe by model name and an
error. Usage: openai_client.py BASE_URL MODEL RECIPE_MODEL. Prints one JSON line and exits 0
when every check holds."""

import json
import sys

import openai
from openai import OpenAI

base, model, steered = sys.argv[1:4]
client = OpenAI(base_url=base, api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "the cat sat"}]


def chat(**kw):
    return client.chat.completions.create(messages=messages, temperature=0, max_tokens=8, **kw)


whole = chat(model=model)
text = whole.choices[0].message.content
assert whole.usage.completion_tokens > 0, whole
assert whole.model_extra["steering"] is None, whole.model_extra

streamed = "".join(
    chunk.choices[0].delta.content or ""
    for chunk in chat(model=model, stream=True)
    if chunk.choices
)
assert streamed == text, (streamed, text)

steered_reply = chat(model=steered)
assert steered_reply.model_extra["steering"]["recipe"] == steered.split("+", 1)[1]

probs = chat(model=model, logprobs=True, top_logprobs=2, n=2)
assert len(probs.choices) == 2
assert all(len(t.top_logprobs) == 2 for t in probs.choices[0].logprobs.content)

completion = client.completions.create(model=model, prompt="the cat", max_tokens=4, temperature=0)
assert completion.choices[0].text is not None

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as e:
    assert "not served here" in str(e), e

ids = [m.id for m in client.models.list()]
assert ids[:2] == [model, steered], ids
print(json.dumps({"chat": text, "steered": steered_reply.choices[0].message.content, "models": ids}))
