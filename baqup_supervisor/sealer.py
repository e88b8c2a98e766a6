"""The writer side of a STREAM construction, shared by baqup-stream-v2 and age.

Both formats cut the plaintext into fixed-size chunks and seal each with a counter
nonce, the last one with a final flag. `ChunkSealer` owns the buffering: `update`
takes any amount of plaintext and returns the header (once) and every chunk that is
complete and known not to be the last; it always keeps at least one byte back, so
only `finalize` seals the final chunk. Subclasses give the header, the chunk size
and `_seal`, and decide in `finalize` what the final chunk is.
"""

from __future__ import annotations


class ChunkSealer:
    header: bytes
    chunk_size: int

    def __init__(self) -> None:
        self._counter = 0
        self._pending = bytearray()
        self._started = False

    def _seal(self, chunk: bytes | memoryview, final: bool) -> bytes:
        raise NotImplementedError

    def update(self, data: bytes) -> bytes:
        out = []
        if not self._started:
            out.append(self.header)
            self._started = True
        size = self.chunk_size
        view = memoryview(data)
        if self._pending:
            need = size - len(self._pending)
            if len(view) <= need:
                self._pending += view
                return b"".join(out)
            self._pending += view[:need]
            view = view[need:]
            out.append(self._seal(bytes(self._pending), final=False))
            self._pending.clear()
        offset = 0
        while len(view) - offset > size:
            out.append(self._seal(view[offset : offset + size], final=False))
            offset += size
        self._pending += view[offset:]
        return b"".join(out)

    def _take_header(self) -> bytes:
        """The header, if `update` has not returned it yet."""
        head = b"" if self._started else self.header
        self._started = True
        return head
