// Local OpenID Connect provider (oidc-provider) for the interoperability tests.
//
// It issues client-credentials access tokens as signed JWTs whose "aud" is the
// --audience value. It listens on 127.0.0.1 only, prints one line
// "READY <issuer>" to stdout once it accepts connections, and writes every log
// line and every oidc-provider warning to stderr.

import { createHash, generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const HOST = '127.0.0.1';

// Resource indicator (RFC 8707) of the single resource server. Clients that
// send no "resource" parameter get a token for it through defaultResource.
const RESOURCE_INDICATOR = 'urn:ext-authz:interop:api';
const RESOURCE_SCOPE = 'read write';

// Each supported --alg value and the key type generated for it.
const SIGNING_KEY_TYPES = {
  RS256: { type: 'rsa', options: { modulusLength: 2048 } },
  ES256: { type: 'ec', options: { namedCurve: 'P-256' } },
};

const USAGE = `Usage: node server.mjs --port PORT [options]

Runs an OpenID Connect provider on http://127.0.0.1:PORT that issues JWT
access tokens through the client_credentials grant.

Options:
  --port PORT           TCP port to listen on, 1-65535 (required)
  --audience VALUE      "aud" claim of issued access tokens (default: Amplify Central)
  --client-id ID        client_id of the confidential client (default: interop-client)
  --client-secret VALUE client_secret of that client (default: interop-secret)
  --token-ttl SECONDS   access token lifetime in seconds (default: 300)
  --alg ALG             JWS algorithm of access tokens: RS256 or ES256 (default: RS256)
  --help                print this text and exit
`;

class UsageError extends Error {}

function log(message) {
  process.stderr.write(`oidc-provider-interop: ${message}\n`);
}

// oidc-provider prints its notices with console.info, which writes to stdout.
// Test harnesses read stdout for the READY line only, so send console output
// that is meant for people to stderr.
console.log = console.error;
console.info = console.error;

function parseOptions(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        port: { type: 'string' },
        audience: { type: 'string', default: 'Amplify Central' },
        'client-id': { type: 'string', default: 'interop-client' },
        'client-secret': { type: 'string', default: 'interop-secret' },
        'token-ttl': { type: 'string', default: '300' },
        alg: { type: 'string', default: 'RS256' },
        help: { type: 'boolean', default: false },
      },
    }));
  } catch (err) {
    throw new UsageError(`invalid command line: ${err.message}`);
  }

  if (values.help) {
    return { help: true };
  }

  if (values.port === undefined) {
    throw new UsageError('missing required option --port');
  }
  const port = parseIntegerOption('--port', values.port);
  if (port < 1 || port > 65535) {
    throw new UsageError(`invalid --port value ${JSON.stringify(values.port)}: expected an integer from 1 to 65535`);
  }

  const tokenTtl = parseIntegerOption('--token-ttl', values['token-ttl']);
  if (tokenTtl < 1) {
    throw new UsageError(`invalid --token-ttl value ${JSON.stringify(values['token-ttl'])}: expected a positive number of seconds`);
  }

  if (!Object.hasOwn(SIGNING_KEY_TYPES, values.alg)) {
    const supported = Object.keys(SIGNING_KEY_TYPES).join(', ');
    throw new UsageError(`invalid --alg value ${JSON.stringify(values.alg)}: expected one of ${supported}`);
  }

  for (const name of ['audience', 'client-id', 'client-secret']) {
    if (values[name].trim() === '') {
      throw new UsageError(`invalid --${name} value: it must not be empty`);
    }
  }

  // oidc-provider rejects client credentials outside printable ASCII
  // (RFC 6749 Appendix A, VSCHAR), so such a client could never authenticate.
  for (const name of ['client-id', 'client-secret']) {
    if (/[^\x20-\x7E]/.test(values[name])) {
      throw new UsageError(`invalid --${name} value: only printable ASCII characters are allowed`);
    }
  }

  return {
    help: false,
    port,
    audience: values.audience,
    clientId: values['client-id'],
    clientSecret: values['client-secret'],
    tokenTtl,
    alg: values.alg,
  };
}

function parseIntegerOption(flag, text) {
  const value = Number.parseInt(text, 10);
  if (!/^[0-9]+$/.test(text) || !Number.isSafeInteger(value)) {
    throw new UsageError(`invalid ${flag} value ${JSON.stringify(text)}: expected a decimal integer`);
  }
  return value;
}

// Compute the RFC 7638 JWK thumbprint (SHA-256, base64url), used as "kid".
function jwkThumbprint(jwk) {
  const requiredMembers = jwk.kty === 'RSA' ? ['e', 'kty', 'n'] : ['crv', 'kty', 'x', 'y'];
  const canonical = JSON.stringify(Object.fromEntries(requiredMembers.map((name) => [name, jwk[name]])));
  return createHash('sha256').update(canonical).digest('base64url');
}

// Generate a fresh private signing key for `alg` as a JWK. Keys live only in
// this process, so every start publishes a new JWKS.
function generateSigningJwk(alg) {
  const { type, options } = SIGNING_KEY_TYPES[alg];
  const { privateKey } = generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: jwkThumbprint(jwk), use: 'sig', alg };
}

function buildConfiguration(options) {
  const keys = Object.keys(SIGNING_KEY_TYPES).map(generateSigningJwk);

  // A client may name the resource explicitly, either by the fixed indicator
  // or by the audience itself when the audience is an absolute URI.
  const acceptedIndicators = new Set([RESOURCE_INDICATOR, options.audience]);

  const resourceServer = {
    scope: RESOURCE_SCOPE,
    audience: options.audience,
    accessTokenTTL: options.tokenTtl,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: options.alg } },
  };

  return {
    clients: [
      {
        client_id: options.clientId,
        client_secret: options.clientSecret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        scope: RESOURCE_SCOPE,
      },
    ],
    jwks: { keys },
    scopes: RESOURCE_SCOPE.split(' '),
    ttl: {
      ClientCredentials: options.tokenTtl,
      AccessToken: options.tokenTtl,
    },
    features: {
      clientCredentials: { enabled: true },
      // A client_credentials-only provider has no use for the built-in login
      // and consent pages, and oidc-provider warns at start-up when they are on.
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => RESOURCE_INDICATOR,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resourceIndicator) => {
          if (!acceptedIndicators.has(resourceIndicator)) {
            throw new errors.InvalidTarget(`unknown resource indicator. Use ${RESOURCE_INDICATOR} or omit the resource parameter`);
          }
          return resourceServer;
        },
      },
    },
  };
}

function logProviderEvents(provider) {
  provider.on('grant.success', (ctx) => {
    log(`issued access token to client ${ctx.oidc.client?.clientId}`);
  });
  provider.on('grant.error', (ctx, err) => {
    // The client is set once its client_id is found, even if authentication then fails.
    const clientId = ctx.oidc?.client?.clientId ?? '(unknown)';
    log(`token request for client_id ${clientId} failed: ${err.message} (${err.error_description ?? 'no description'})`);
  });
  provider.on('server_error', (_ctx, err) => {
    log(`server error: ${err.stack ?? err}`);
  });
}

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, HOST, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

function stopOnSignals(server) {
  let stopping = false;
  const stop = (signal) => {
    if (stopping) {
      return;
    }
    stopping = true;
    log(`received ${signal}, stopping`);
    server.close((err) => {
      if (err) {
        log(`closing the server failed: ${err.message}`);
        process.exit(1);
      }
      log('stopped');
      process.exit(0);
    });
    // Keep-alive connections would otherwise hold close() open.
    server.closeAllConnections();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

async function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (err) {
    if (err instanceof UsageError) {
      log(`${err.message}\nRun "node server.mjs --help" for the list of options.`);
      process.exit(2);
    }
    throw err;
  }

  if (options.help) {
    process.stdout.write(USAGE);
    return;
  }

  const issuer = `http://${HOST}:${options.port}`;
  const provider = new Provider(issuer, buildConfiguration(options));
  logProviderEvents(provider);

  const server = createServer(provider.callback());
  try {
    await listen(server, options.port);
  } catch (err) {
    const reason = err.code === 'EADDRINUSE' ? `port ${options.port} is already in use` : err.message;
    log(`failed to listen on ${HOST}:${options.port}: ${reason}`);
    process.exit(1);
  }

  stopOnSignals(server);
  log(`listening: issuer ${issuer}, client ${options.clientId}, audience ${JSON.stringify(options.audience)}, alg ${options.alg}, token TTL ${options.tokenTtl}s`);
  process.stdout.write(`READY ${issuer}\n`);
}

main().catch((err) => {
  log(`start-up failed: ${err.stack ?? err}`);
  process.exit(1);
});
