"""Groups (n > 1 completions, beams; ``SequenceGroup``) in the scheduler: the checks that a
group can run at all, counting a running group whole, and forking a group's members off its
leader's pages (and a beam update's forks off their parents'). A mixin of
``engine.scheduler.Scheduler`` (its config, KV cache manager, running list, clock and
``_finish``).
"""

from __future__ import annotations

from paged_jax.engine.beam import BeamGroup, BeamUpdate
from paged_jax.engine.sequence import Sequence, SequenceGroup, SequenceStatus


class GroupForking:
    def check_group_size(self, num_members: int) -> None:
        """A group runs all its members at once: ValueError when max_num_seqs cannot hold it."""
        if num_members > self.config.max_num_seqs:
            raise ValueError(
                f"n={num_members} completions cannot run together: more than "
                f"max_num_seqs={self.config.max_num_seqs}"
            )

    def check_group_fits(
        self, num_prompt_tokens: int, max_tokens: int, num_members: int, name: str = "n"
    ) -> None:
        """ValueError when the KV pool cannot hold a group whose members all need their own
        pages at once. A group runs whole, so below that it alone preempts itself and recomputes
        forever. Completions (``n``) decode side by side and may all reach full length in the
        same step; beams mostly share pages, but they can diverge right after the prompt and
        each hold its own pages to full length, so they are checked at that bound too. Members
        share the prompt's full pages but the last."""
        kv = self.kv_cache
        if num_members < 2:
            return  # one sequence of max_model_len always fits (checked in __init__)
        # K/V of every token but the last one sampled; the prompt's last token always computes
        end = min(num_prompt_tokens + max_tokens, self.config.max_model_len)
        num_kv_tokens = max(num_prompt_tokens, end - 1)
        shared = (num_prompt_tokens - 1) // kv.page_size
        need = shared + num_members * (kv.pages_for(num_kv_tokens) - shared)
        if need > kv.num_usable_pages:
            raise ValueError(
                f"{name}={num_members} sequences of a {num_prompt_tokens}-token prompt with "
                f"max_tokens={max_tokens} need {need} KV pages of page_size={kv.page_size} "
                f"at once, more than the {kv.num_usable_pages} usable of num_pages="
                f"{kv.num_pages}: give the KV cache more memory or lower {name} or max_tokens"
            )

    def apply_beam_update(self, group: BeamGroup, update: BeamUpdate) -> list[Sequence]:
        """Carry out a beam group's update: forks share the parent's pages, extended beams get
        their next token, dropped beams free theirs. Returns the new beams."""
        new = []
        for parent, token, score in update.fork:
            child = parent.fork(token)
            self._run_forked(parent, [child])
            group.add_beam(child, score)
            new.append(child)
        for beam, token, _ in update.extend:
            beam.append_token(token)
        now = self._clock()
        for beam in update.drop:
            self._finish(beam, "abort", None, now)
        group.prune()
        return new

    def _num_running_slots(self) -> int:
        """Running sequences, a running group counted whole (unforked members and the beams
        it may fork to included)."""
        num_single, groups = 0, {}
        for seq in self._running:
            if seq.group is None:
                num_single += 1
            else:
                groups[id(seq.group)] = seq.group
        return num_single + sum(group_size(g) for g in groups.values())

    def _ready_to_fork(self, seq: Sequence) -> bool:
        return (
            seq.group is not None
            and not seq.group.forked
            and seq.prefill_limit is not None
            and seq.num_computed_tokens == seq.prefill_limit
        )

    def _fork_group(self, leader: Sequence) -> list[Sequence]:
        """Every unfinished member of the leader's group shares the leader's pages now and
        runs; returns them, leader first (they follow it in admission order)."""
        group: SequenceGroup = leader.group
        members = group.unfinished
        self._run_forked(leader, members[1:])
        leader.prefill_limit = None
        group.forked = True
        return members

    def _run_forked(self, parent: Sequence, children: list[Sequence]) -> None:
        """The children share the parent's pages and computed tokens, and run right after it
        (admission order: a group stays together as preemption victims)."""
        for child in children:
            self.kv_cache.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
        at = self._running.index(parent) + 1
        self._running[at:at] = children


def num_members_of(seq: Sequence) -> int:
    """Sequences ``seq``'s group may run at once."""
    return 1 if seq.group is None else group_size(seq.group)


def group_size(group: SequenceGroup) -> int:
    """A beam group grows to its beam_width; other groups run their unfinished members."""
    return group.params.beam_width if group.is_beam else len(group.unfinished)
