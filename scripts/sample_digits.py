#!/usr/bin/env python3
"""Writes docs/digits/: three MNIST test digits saved as a person might save them, and a file
that is no image, for the README's `coordinator predict` example. Standard library only.

    python3 scripts/sample_digits.py [MNIST_DIR]    # default ~/.cache/lockstep/mnist
"""
import os
import struct
import sys
import zlib

mnist = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/lockstep/mnist")
images = open(os.path.join(mnist, "t10k-images-idx3-ubyte"), "rb").read()[16:]
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "digits")
os.makedirs(out, exist_ok=True)


def write_png(name, rows):
    """An 8-bit greyscale PNG of `rows` (lists of grey levels)."""
    raw = b"".join(b"\x00" + bytes(row) for row in rows)

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 0, 0, 0, 0)
    with open(os.path.join(out, name), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def digit(index):
    start = index * 784
    return [list(images[start + r * 28 : start + r * 28 + 28]) for r in range(28)]


def enlarged(rows, k):
    return [[v for v in row for _ in range(k)] for row in rows for _ in range(k)]


# Test image 0 (a 7) as MNIST stores it: white ink on black, 28x28.
write_png("mnist-seven.png", digit(0))
# Test image 1 (a 2): dark ink on white, 4x larger.
write_png("inverted-two.png", [[255 - v for v in row] for row in enlarged(digit(1), 4)])
# Test image 2 (a 1): dark ink, 3x larger, in the top right of a wide white sheet.
sheet = [[255] * 300 for _ in range(160)]
for y, row in enumerate(enlarged(digit(2), 3)):
    for x, v in enumerate(row):
        sheet[10 + y][200 + x] = 255 - v
write_png("off-centre-one.png", sheet)
with open(os.path.join(out, "not-an-image.png"), "w") as f:
    f.write("hello\n")
