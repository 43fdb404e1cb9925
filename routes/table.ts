/**
 * Route metadata derived from the handlers the app really registered (Hono's `app.routes`), so that
 * the metrics label, the 405-with-Allow answer and the idle-timeout rule cannot miss a route: adding a
 * handler is all it takes. Paths are matched by Hono's own router, with the same syntax and the same
 * strictness as the dispatch itself.
 */
import { TrieRouter } from "hono/router/trie-router";

export interface RouteInfo {
  /** The registered path without regex constraints ("/v1/models/:model"); the metrics label. */
  route: string;
  /** Methods with a handler, plus HEAD wherever GET is (Hono answers HEAD from the GET handler). */
  methods: readonly string[];
  /** The methods whose requests may stay open long, so that Bun's idle timeout is turned off for them. */
  long: readonly string[];
}

/** Decides, per registered route, whether its requests may stay open long. */
export type LongRule = (method: string, route: string) => boolean;

/** Hono marks middleware (app.use, app.all) as method "ALL": those are not routes of their own. */
const MIDDLEWARE = "ALL";

export class RouteTable {
  readonly all: readonly RouteInfo[];
  private readonly router = new TrieRouter<RouteInfo>();

  constructor(registered: readonly { method: string; path: string }[], isLong: LongRule) {
    const byPath = new Map<string, string[]>();
    for (const { method, path } of registered) {
      if (method === MIDDLEWARE) continue;
      const methods = byPath.get(path) ?? [];
      if (!methods.includes(method)) methods.push(method);
      byPath.set(path, methods);
    }
    const all: RouteInfo[] = [];
    for (const [path, own] of byPath) {
      const route = path.replace(/\{[^}]*\}/g, "");
      const methods = own.includes("GET") && !own.includes("HEAD") ? [...own, "HEAD"] : own;
      const info: RouteInfo = { route, methods, long: own.filter((m) => isLong(m, route)) };
      all.push(info);
      // Registered for every method: a path match with the wrong method is a 405, not a 404.
      this.router.add(MIDDLEWARE, path, info);
    }
    this.all = all;
  }

  /** The route a request path belongs to (whatever its method), or null for an unknown path. */
  match(path: string, method?: string): RouteInfo | null {
    const [found] = this.router.match(method ?? "GET", path);
    const infos = found.map(([info]) => info);
    return (method && infos.find((r) => r.methods.includes(method))) || infos[0] || null;
  }

  /** Whether a request may stay open long (upload, generation, event stream). */
  isLong(method: string, path: string): boolean {
    return this.match(path, method)?.long.includes(method) ?? false;
  }
}
