"""Draw the demo's example images and videos (deterministic; PIL, numpy and OpenCV only).

Run from the repository root:  python assets/make_assets.py
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).resolve().parent
BACKGROUND = (250, 250, 247)
INK = (30, 30, 30)
RED, GREEN, BLUE, YELLOW = (220, 50, 47), (60, 160, 70), (38, 110, 210), (240, 190, 30)


def font(size):
    # Pillow's bundled scalable font (needs FreeType), so no system font is required.
    return ImageFont.load_default(size=size)


def bar_chart(title, bars, size=(480, 360)):
    """A bar chart with value labels; bars is a list of (label, value 0-10, colour)."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.text((width // 2, 28), title, font=font(30), fill=INK, anchor="mm")
    floor, unit = height - 50, 25
    draw.line((40, floor, width - 30, floor), fill=INK, width=3)
    slot = (width - 80) // len(bars)
    for index, (label, value, colour) in enumerate(bars):
        left = 50 + index * slot + slot // 6
        right = left + slot * 2 // 3
        draw.rectangle((left, floor - value * unit, right, floor), fill=colour)
        draw.text(((left + right) // 2, floor - value * unit - 16), str(value), font=font(24), fill=INK, anchor="mm")
        draw.text(((left + right) // 2, floor + 24), label, font=font(24), fill=INK, anchor="mm")
    return image


def shapes_scene(shapes, size=(480, 360)):
    """Flat shapes on a table-like background; shapes is a list of (kind, centre, radius, colour)."""
    image = Image.new("RGB", size, (235, 228, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size[1] * 2 // 3, size[0], size[1]), fill=(190, 160, 120))
    for kind, (x, y), radius, colour in shapes:
        box = (x - radius, y - radius, x + radius, y + radius)
        if kind == "circle":
            draw.ellipse(box, fill=colour, outline=INK, width=2)
        elif kind == "square":
            draw.rectangle(box, fill=colour, outline=INK, width=2)
        else:
            corners = [(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)]
            draw.polygon(corners, fill=colour, outline=INK)
    return image


def menu_board(title, items, size=(400, 300)):
    """A chalkboard-style price list with large text; items is a list of (name, price)."""
    image = Image.new("RGB", size, (40, 60, 50))
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 6, size[0] - 7, size[1] - 7), outline=(150, 110, 60), width=8)
    draw.text((size[0] // 2, 50), title, font=font(38), fill=(255, 240, 200), anchor="mm")
    for row, (name, price) in enumerate(items):
        y = 115 + row * 55
        draw.text((40, y), name, font=font(34), fill=(245, 245, 245), anchor="lm")
        draw.text((size[0] - 40, y), price, font=font(34), fill=(255, 220, 120), anchor="rm")
    return image


def star_points(cx, cy, outer, inner=None):
    inner = inner or outer * 0.45
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    return [(cx + r * np.cos(a), cy - r * np.sin(a)) for r, a in zip(radii, angles)]


def stars(count, size=(320, 240)):
    """count yellow stars spread over a dark sky, laid out on a fixed grid so the count is unambiguous."""
    image = Image.new("RGB", size, (20, 30, 70))
    draw = ImageDraw.Draw(image)
    spots = [(60, 60), (160, 70), (260, 55), (90, 170), (210, 175), (160, 125)]
    for cx, cy in spots[:count]:
        draw.polygon(star_points(cx, cy, 34), fill=YELLOW)
    return image


def ball_frames(count=40, size=(320, 240)):
    """A ball rolling left to right along a floor, red for the first half of the clip, blue after."""
    width, height = size
    for index in range(count):
        frame = Image.new("RGB", size, (225, 235, 245))
        draw = ImageDraw.Draw(frame)
        draw.rectangle((0, 180, width, height), fill=(120, 170, 90))
        x = 30 + (width - 60) * index / (count - 1)
        colour = RED if index < count // 2 else BLUE
        draw.ellipse((x - 22, 136, x + 22, 180), fill=colour, outline=INK, width=2)
        yield frame


def traffic_light_frames(count=36, size=(240, 240)):
    """A traffic light lit green, then yellow, then red, a third of the clip each."""
    for index in range(count):
        frame = Image.new("RGB", size, (200, 215, 230))
        draw = ImageDraw.Draw(frame)
        draw.rectangle((110, 190, 130, 240), fill=(70, 70, 70))
        draw.rounded_rectangle((80, 10, 160, 195), radius=14, fill=(35, 35, 35))
        lit = 2 - index * 3 // count  # 2 = bottom (green) first, 0 = top (red) last
        for slot, colour in enumerate((RED, YELLOW, GREEN)):
            shade = colour if slot == lit else tuple(c // 4 for c in colour)
            draw.ellipse((95, 20 + slot * 58, 145, 70 + slot * 58), fill=shade)
        yield frame


def write_video(path, frames, fourcc, fps=10):
    frames = [np.asarray(frame)[:, :, ::-1] for frame in frames]  # OpenCV wants BGR
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path.name} with fourcc {fourcc!r}")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame))
    writer.release()


def main():
    images = {
        "chart_sales_2023.png": bar_chart("Sales 2023", [("red", 6, RED), ("green", 4, GREEN), ("blue", 3, BLUE)]),
        "chart_sales_2024.png": bar_chart("Sales 2024", [("red", 5, RED), ("green", 4, GREEN), ("blue", 9, BLUE)]),
        "shapes_before.png": shapes_scene([
            ("circle", (90, 200), 40, RED), ("square", (230, 190), 45, BLUE),
            ("triangle", (370, 200), 45, GREEN), ("circle", (400, 70), 30, YELLOW),
        ]),
        "shapes_after.png": shapes_scene([
            ("circle", (90, 200), 40, RED), ("square", (230, 190), 45, GREEN),
            ("triangle", (370, 200), 45, GREEN), ("circle", (80, 70), 30, YELLOW),
        ]),
        "menu_last_week.png": menu_board("CAFE MENU", [("Coffee", "$3"), ("Tea", "$2"), ("Cake", "$4")]),
        "menu_today.png": menu_board("CAFE MENU", [("Coffee", "$4"), ("Tea", "$2"), ("Cake", "$5")]),
        "stars_two.png": stars(2),
        "stars_three.png": stars(3),
        "stars_five.png": stars(5),
    }
    for name, image in images.items():
        image.save(ASSETS / name, optimize=True)
    # mp4v (MPEG-4 Part 2) is what OpenCV's bundled FFmpeg can encode into .mp4 (no H.264 encoder), but
    # browsers do not play it; VP9 in .webm is both readable by OpenCV and playable in a browser.
    write_video(ASSETS / "ball_red_to_blue.mp4", ball_frames(), "mp4v")
    write_video(ASSETS / "traffic_light.webm", traffic_light_frames(), "VP90")


if __name__ == "__main__":
    main()
