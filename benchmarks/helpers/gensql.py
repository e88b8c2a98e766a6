"""Realistic compressible input: pseudo pg_dump output (COPY blocks of order rows).

usage: gensql.py PATH SIZE_BYTES
Deterministic (seeded per 16 MiB chunk) and generated on every CPU at once; zstd -3
compresses it to about a quarter, as it does real SQL dumps.
"""

import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor

CHUNK = 16 * 1024 * 1024
FIRST = (
    "james",
    "mary",
    "john",
    "patricia",
    "robert",
    "jennifer",
    "michael",
    "linda",
    "william",
    "elizabeth",
    "david",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "chris",
    "nancy",
    "daniel",
    "lisa",
    "matthew",
    "betty",
    "anthony",
    "margaret",
    "mark",
    "sandra",
)
LAST = (
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
    "clark",
    "ramirez",
    "lewis",
    "robinson",
)
DOMAINS = ("example.com", "mail.example.org", "corp.example.net", "shop.example.io")
STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled", "refunded")
WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "order",
    "customer",
    "please",
    "deliver",
    "before",
    "noon",
    "gift",
    "wrap",
    "fragile",
    "handle",
    "with",
    "care",
    "leave",
    "at",
    "door",
    "call",
    "on",
    "arrival",
)
HEADER = (
    b"--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n"
    b"SET client_encoding = 'UTF8';\n\n"
)


def chunk(index: int) -> bytes:
    rnd = random.Random(index)
    parts = [HEADER] if index == 0 else []
    size = sum(len(p) for p in parts)
    row = index * 200_000
    table = 0
    while size < CHUNK:
        table += 1
        rows = [
            f"\nCOPY public.orders_{(index + table) % 7} (id, customer_id, email, created_at, "
            "status, amount, currency, note) FROM stdin;\n"
        ]
        for _ in range(5000):
            row += 1
            stamp = time.gmtime(1_600_000_000 + row * 7 + rnd.randrange(7))
            note = " ".join(rnd.choices(WORDS, k=rnd.randrange(0, 9))) or "\\N"
            rows.append(
                f"{row}\t{rnd.randrange(1, 500_000)}\t{rnd.choice(FIRST)}.{rnd.choice(LAST)}"
                f"{rnd.randrange(100)}@{rnd.choice(DOMAINS)}\t"
                f"{time.strftime('%Y-%m-%d %H:%M:%S', stamp)}+00\t{rnd.choice(STATUSES)}\t"
                f"{rnd.randrange(100, 9_999_999) / 100:.2f}\tEUR\t{note}\n"
            )
        rows.append("\\.\n")
        block = "".join(rows).encode()
        parts.append(block)
        size += len(block)
    return b"".join(parts)[:CHUNK]


def main() -> None:
    path, size = sys.argv[1], int(sys.argv[2])
    count = -(-size // CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for index, data in enumerate(pool.map(chunk, range(count))):
                os.pwrite(fd, data[: size - index * CHUNK], index * CHUNK)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
