"""http(s) image URLs for the API, when the server is started with --allow-image-urls.

Each host is checked by safehttpx before any byte is sent: it must resolve to a public address (no loopback,
private, link-local or metadata addresses), and the connection goes to the address that was checked, so a
DNS answer cannot change between the check and the request. Redirects are followed by hand, each hop checked the
same way. A download is bounded in bytes (read as a stream, stopped at the limit), in time and in redirects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import httpx
import safehttpx

from llava_ui.openai.format import MAX_IMAGE_BYTES, APIError, ChatMessage, ImageURL

MAX_URL_IMAGES = 16


@dataclass(frozen=True)
class URLPolicy:
    max_bytes: int = MAX_IMAGE_BYTES
    timeout_s: float = 20.0  # the whole download, redirects included
    max_redirects: int = 3
    trusted_hosts: tuple[str, ...] = field(default=())  # skip the public-address check (e.g. an intranet host)


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(url, where) of every http(s) image part, in order."""
    found = []
    for i, message in enumerate(messages):
        if message.role != "user" or not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            if part.type == "image_url" and url and url.split(":", 1)[0].lower() in ("http", "https"):
                found.append((url, f"messages.{i}.content.{j}"))
    return found


async def fetch_images(messages: list[ChatMessage], policy: URLPolicy) -> dict[str, bytes]:
    """The bytes of every http(s) image URL in the messages, fetched one after another within the limits."""
    urls = image_urls(messages)
    if len(urls) > MAX_URL_IMAGES:
        raise APIError(400, f"the request names {len(urls)} image URLs; the limit is {MAX_URL_IMAGES}",
                       param="messages")
    fetched = {}
    for url, where in urls:
        if url not in fetched:
            fetched[url] = await fetch(url, policy, where)
    return fetched


async def fetch(url: str, policy: URLPolicy, where: str = "") -> bytes:
    try:
        with anyio.fail_after(policy.timeout_s):
            return await _follow(url, policy, where)
    except TimeoutError:
        raise APIError(400, f"fetching the image took longer than {policy.timeout_s:g} s: {url}",
                       code="image_fetch_failed", param=where) from None
    except httpx.HTTPError as err:
        raise APIError(400, f"the image could not be fetched ({type(err).__name__}): {url}",
                       code="image_fetch_failed", param=where) from None


async def _follow(url: str, policy: URLPolicy, where: str) -> bytes:
    for _ in range(policy.max_redirects + 1):
        async with _client(url, policy, where) as client, client.stream("GET", url) as response:
            if response.is_redirect:
                target = response.headers.get("location")
                if not target:
                    break
                url = str(response.url.join(target))
                if url.split(":", 1)[0].lower() not in ("http", "https"):
                    raise APIError(400, f"the image URL redirects to a non-http URL: {url}",
                                   code="image_fetch_failed", param=where)
                continue
            if response.status_code != 200:
                raise APIError(400, f"the image URL answered HTTP {response.status_code}: {url}",
                               code="image_fetch_failed", param=where)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _too_large(policy, url, where)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise _too_large(policy, url, where)
            return bytes(body)
    raise APIError(400, f"the image URL redirects more than {policy.max_redirects} times: {url}",
                   code="image_fetch_failed", param=where)


def _client(url: str, policy: URLPolicy, where: str) -> httpx.AsyncClient:
    """A client whose connections go only to the address safehttpx checked for this URL's host."""
    host = httpx.URL(url).host
    if safehttpx.matches_domain_whitelist(host, list(policy.trusted_hosts)):
        return httpx.AsyncClient(follow_redirects=False, trust_env=False)
    return _CheckedClient(host, where)


class _CheckedClient:
    """`async with`: resolves and checks the host first (safehttpx), then a client pinned to that address."""

    def __init__(self, host: str, where: str):
        self.host, self.where, self.client = host, where, None

    async def __aenter__(self) -> httpx.AsyncClient:
        try:
            address = await safehttpx.async_validate_url(self.host)
        except ValueError:
            raise APIError(400, f"image URLs must point to a public internet host; {self.host!r} does not",
                           code="image_url_not_allowed", param=self.where) from None
        self.client = httpx.AsyncClient(transport=safehttpx.AsyncSecureTransport(address), follow_redirects=False,
                                        trust_env=False)
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()


def _too_large(policy: URLPolicy, url: str, where: str) -> APIError:
    return APIError(400, f"the image at {url} is larger than {policy.max_bytes >> 20} MB", code="image_too_large",
                    param=where)
