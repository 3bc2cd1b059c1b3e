"""Cradle's skill curation: action sequences that solved a task, kept and recalled as few-shot examples.

A skill is the task's utterance and the actions that earned a reward, each annotated with the element it
touched (refs change between episodes; the annotation tells the model *what* was clicked). Retrieval embeds
the new utterance with the packaged all-MiniLM-L6-v2 and returns the most similar stored skills.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def generalize(utterance: str, fields: list) -> str:
    """The utterance with this instance's values (miniwob's parsed fields) replaced by X: retrieval should match
    "Enter "Jerald" into the text field" to other text-entry tasks, not to other tasks that mention Jerald."""
    out = utterance
    for _, value in sorted(fields, key=lambda kv: -len(str(kv[1]))):
        if str(value).strip():
            out = out.replace(str(value), "X")
    return out


@dataclass(frozen=True)
class Skill:
    task: str
    utterance: str
    steps: tuple[str, ...]  # e.g. 'click(6)  # button "Ok"'
    key: str = ""  # what retrieval compares: the generalized utterance (default: the utterance)

    def as_example(self) -> str:
        return f"Task: {self.utterance}\n" + "\n".join(self.steps)


class SkillLibrary:
    """Per team actor (so per policy arm): what this arm's own agents learned, nothing from other arms."""

    def __init__(self, max_per_task: int = 4, min_similarity: float = 0.3):
        self.max_per_task, self.min_similarity = max_per_task, min_similarity
        self.skills: list[Skill] = []
        self._vecs = np.zeros((0, 384), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.skills)

    def add(self, skill: Skill) -> bool:
        """Store a successful sequence; the oldest of its task goes once the task has `max_per_task`."""
        if not skill.steps or any(s.utterance == skill.utterance and s.steps == skill.steps for s in self.skills):
            return False
        from slmshift.platform.embeddings import embed

        same = [i for i, s in enumerate(self.skills) if s.task == skill.task]
        if len(same) >= self.max_per_task:
            drop = same[0]
            del self.skills[drop]
            self._vecs = np.delete(self._vecs, drop, axis=0)
        self.skills.append(skill)
        self._vecs = np.ascontiguousarray(np.vstack([self._vecs, embed([skill.key or skill.utterance])]))
        return True

    def retrieve(self, utterance: str, k: int = 2) -> list[Skill]:
        """Up to `k` stored skills whose key is most similar to `utterance` (a generalized utterance; cosine
        similarity ≥ min_similarity)."""
        if not self.skills or k <= 0:
            return []
        from slmshift.platform.embeddings import embed

        sims = self._vecs @ embed([utterance])[0]
        order = np.argsort(-sims)[:k]
        return [self.skills[i] for i in order if sims[i] >= self.min_similarity]
