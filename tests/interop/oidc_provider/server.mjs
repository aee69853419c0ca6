// Local OpenID Connect provider (oidc-provider) for the interoperability tests.
//
// It issues client-credentials access tokens whose "aud" is the --audience
// value. They are signed JWTs by default. With --token-format opaque they are
// random strings, and a second client, the resource server, looks them up at
// the RFC 7662 introspection endpoint. The server listens on 127.0.0.1 only,
// prints one line "READY <issuer>" to stdout once it accepts connections, and
// writes every log line and every oidc-provider warning to stderr.
//
// Signing keys are generated at every start, or read from --jwks-file so that
// tests can keep or rotate keys across restarts.

import {
  createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify,
} from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const HOST = '127.0.0.1';

// Resource indicator (RFC 8707) of the single resource server. Clients that
// send no "resource" parameter get a token for it through defaultResource.
const RESOURCE_INDICATOR = 'urn:ext-authz:interop:api';
const RESOURCE_SCOPE = 'read write';

// Each supported --alg value, the key type generated for it, and the JWK
// members that a --jwks-file key of that alg must have.
const SIGNING_KEY_TYPES = {
  RS256: {
    type: 'rsa',
    options: { modulusLength: 2048 },
    kty: 'RSA',
    publicMembers: ['n', 'e'],
    privateMembers: ['d', 'p', 'q', 'dp', 'dq', 'qi'],
  },
  ES256: {
    type: 'ec',
    options: { namedCurve: 'P-256' },
    kty: 'EC',
    crv: 'P-256',
    publicMembers: ['x', 'y'],
    privateMembers: ['d'],
  },
};

// jose, which oidc-provider signs with, rejects RS256 keys below this size
// when it signs a token.
const MIN_RSA_MODULUS_BITS = 2048;

// Values of --token-format, passed on as the resource server's
// accessTokenFormat.
const TOKEN_FORMATS = ['jwt', 'opaque'];

const USAGE = `Usage: node server.mjs --port PORT [options]

Runs an OpenID Connect provider on http://127.0.0.1:PORT that issues access
tokens through the client_credentials grant, and serves token introspection
(RFC 7662) and revocation (RFC 7009).

Options:
  --port PORT           TCP port to listen on, 1-65535 (required)
  --audience VALUE      "aud" claim of issued access tokens (default: Amplify Central)
  --client-id ID        client_id of the client that requests tokens (default: interop-client)
  --client-secret VALUE client_secret of that client (default: interop-secret)
  --token-ttl SECONDS   access token lifetime in seconds (default: 300)
  --token-format FORMAT access token format: jwt (signed JWT) or opaque (random
                        string that only introspection can resolve) (default: jwt)
  --alg ALG             JWS algorithm of access tokens: RS256 or ES256 (default: RS256).
                        With --token-format opaque it signs no access token.
  --jwks-file PATH      JSON file {"keys": [...]} of private JWKs to sign with instead
                        of generated keys. Each key needs "kid", "alg" (RS256 or
                        ES256) and "use": "sig", and at least one must have the
                        --alg algorithm. The first key in the file with that alg
                        signs access tokens. /jwks publishes every key, public
                        members only.
  --introspection-client-id ID
                        client_id of the resource server client, the only client
                        that may introspect tokens (default: ext-authz)
  --introspection-client-secret VALUE
                        client_secret of that client (default: ext-authz-secret)
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
        'token-format': { type: 'string', default: 'jwt' },
        alg: { type: 'string', default: 'RS256' },
        'jwks-file': { type: 'string' },
        'introspection-client-id': { type: 'string', default: 'ext-authz' },
        'introspection-client-secret': { type: 'string', default: 'ext-authz-secret' },
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

  if (!TOKEN_FORMATS.includes(values['token-format'])) {
    throw new UsageError(`invalid --token-format value ${JSON.stringify(values['token-format'])}: expected one of ${TOKEN_FORMATS.join(', ')}`);
  }

  if (!Object.hasOwn(SIGNING_KEY_TYPES, values.alg)) {
    const supported = Object.keys(SIGNING_KEY_TYPES).join(', ');
    throw new UsageError(`invalid --alg value ${JSON.stringify(values.alg)}: expected one of ${supported}`);
  }

  const credentialOptions = [
    'client-id', 'client-secret', 'introspection-client-id', 'introspection-client-secret',
  ];
  for (const name of ['audience', ...credentialOptions]) {
    if (values[name].trim() === '') {
      throw new UsageError(`invalid --${name} value: it must not be empty`);
    }
  }

  // oidc-provider rejects client credentials outside printable ASCII
  // (RFC 6749 Appendix A, VSCHAR), so such a client could never authenticate.
  for (const name of credentialOptions) {
    if (/[^\x20-\x7E]/.test(values[name])) {
      throw new UsageError(`invalid --${name} value: only printable ASCII characters are allowed`);
    }
  }

  // oidc-provider 9.13.3 throws at start-up on two static clients with the
  // same client_id (lib/helpers/initialize_clients.js), so reject it here.
  if (values['introspection-client-id'] === values['client-id']) {
    throw new UsageError(`invalid --introspection-client-id value ${JSON.stringify(values['introspection-client-id'])}: it must differ from --client-id`);
  }

  // signingKeys stays undefined when keys are to be generated at start-up.
  let signingKeys;
  if (values['jwks-file'] !== undefined) {
    signingKeys = readSigningKeys(values['jwks-file'], values.alg);
  }

  return {
    help: false,
    port,
    audience: values.audience,
    clientId: values['client-id'],
    clientSecret: values['client-secret'],
    tokenTtl,
    tokenFormat: values['token-format'],
    alg: values.alg,
    jwksFile: values['jwks-file'],
    signingKeys,
    introspectionClientId: values['introspection-client-id'],
    introspectionClientSecret: values['introspection-client-secret'],
  };
}

// Read and check the --jwks-file key set, and return its keys in file order.
// The order matters because oidc-provider 9.13.3 signs with the first key of
// the token's alg. Its KeyStore.selectForSign (lib/helpers/keystore.js) keeps
// the matching keys and stable-sorts them by a score that is equal for keys
// that all have "alg" and "use", as every key here must.
// "key_ops" is dropped because oidc-provider would publish it at /jwks. PyJWT
// exports private keys with ["sign"], which tells verifiers not to verify
// with the public key.
function readSigningKeys(path, tokenAlg) {
  const fail = (reason) => {
    throw new UsageError(`invalid --jwks-file ${JSON.stringify(path)}: ${reason}`);
  };

  let text;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    fail(`cannot read the file: ${err.message}`);
  }

  let jwks;
  try {
    jwks = JSON.parse(text);
  } catch (err) {
    fail(`the file is not valid JSON: ${err.message}`);
  }

  if (!isPlainObject(jwks) || !Array.isArray(jwks.keys)) {
    fail('expected a JSON object with a "keys" array, as in {"keys": [...]}');
  }
  if (jwks.keys.length === 0) {
    fail('the "keys" array is empty, so there is no key to sign with');
  }

  const kids = new Set();
  jwks.keys.forEach((jwk, index) => {
    const problem = checkSigningJwk(jwk);
    if (problem) {
      let label = `keys[${index}]`;
      if (isPlainObject(jwk) && typeof jwk.kid === 'string') {
        label += ` (kid ${JSON.stringify(jwk.kid)})`;
      }
      fail(`${label}: ${problem}`);
    }
    if (kids.has(jwk.kid)) {
      fail(`keys[${index}]: duplicate kid ${JSON.stringify(jwk.kid)}. Give every key its own kid`);
    }
    kids.add(jwk.kid);
  });

  if (!jwks.keys.some((jwk) => jwk.alg === tokenAlg)) {
    const algs = [...new Set(jwks.keys.map((jwk) => jwk.alg))].join(', ');
    fail(`no key has "alg": "${tokenAlg}", which --alg selects for access tokens (the file has ${algs}). Add such a key or change --alg`);
  }

  return jwks.keys.map(({ key_ops: _keyOps, ...jwk }) => jwk);
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

// Check one --jwks-file key and return a description of the first problem
// found, or undefined when the key can sign.
function checkSigningJwk(jwk) {
  if (!isPlainObject(jwk)) {
    return 'expected a JWK object';
  }
  if (typeof jwk.kid !== 'string' || jwk.kid === '') {
    return 'missing "kid": each key needs a non-empty string "kid"';
  }
  const supportedAlgs = Object.keys(SIGNING_KEY_TYPES).join(' or ');
  if (jwk.alg === undefined) {
    return `missing "alg": expected ${supportedAlgs}`;
  }
  if (!Object.hasOwn(SIGNING_KEY_TYPES, jwk.alg)) {
    return `invalid "alg" ${JSON.stringify(jwk.alg)}: expected ${supportedAlgs}`;
  }
  if (jwk.use === undefined) {
    return 'missing "use": expected "sig"';
  }
  if (jwk.use !== 'sig') {
    return `invalid "use" ${JSON.stringify(jwk.use)}: expected "sig"`;
  }

  const keyType = SIGNING_KEY_TYPES[jwk.alg];
  if (jwk.kty !== keyType.kty) {
    return `invalid "kty" ${JSON.stringify(jwk.kty)}: an ${jwk.alg} key must have "kty": "${keyType.kty}"`;
  }
  if (keyType.crv !== undefined && jwk.crv !== keyType.crv) {
    return `invalid "crv" ${JSON.stringify(jwk.crv)}: an ${jwk.alg} key must have "crv": "${keyType.crv}"`;
  }
  for (const member of keyType.publicMembers) {
    if (typeof jwk[member] !== 'string' || jwk[member] === '') {
      return `missing public key member "${member}"`;
    }
  }
  const missingPrivate = keyType.privateMembers.filter((member) => typeof jwk[member] !== 'string' || jwk[member] === '');
  if (missingPrivate.length > 0) {
    return `not a private key: missing ${missingPrivate.map((member) => `"${member}"`).join(', ')}. Export the private key, not only its public part`;
  }
  return checkKeyPair(jwk, keyType);
}

// Load the key with node:crypto and sign and verify a test message, so that a
// malformed key, or private members that belong to another public key, fail
// here and not at the first token request.
function checkKeyPair(jwk, keyType) {
  const publicJwk = { kty: jwk.kty, crv: jwk.crv };
  for (const member of keyType.publicMembers) {
    publicJwk[member] = jwk[member];
  }

  let privateKey;
  let publicKey;
  try {
    privateKey = createPrivateKey({ key: jwk, format: 'jwk' });
    publicKey = createPublicKey({ key: publicJwk, format: 'jwk' });
  } catch (err) {
    return `invalid key material: ${err.message}`;
  }

  if (jwk.kty === 'RSA') {
    const { modulusLength } = privateKey.asymmetricKeyDetails;
    if (modulusLength < MIN_RSA_MODULUS_BITS) {
      return `the RSA key has ${modulusLength} bits, but RS256 needs at least ${MIN_RSA_MODULUS_BITS}`;
    }
  }

  const message = Buffer.from('jwks-file key pair check');
  const signature = sign('sha256', message, privateKey);
  if (!verify('sha256', message, publicKey, signature)) {
    return 'the private members do not match the public members of this key';
  }
  return undefined;
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
  const keys = options.signingKeys ?? Object.keys(SIGNING_KEY_TYPES).map(generateSigningJwk);

  // A client may name the resource explicitly, either by the fixed indicator
  // or by the audience itself when the audience is an absolute URI.
  const acceptedIndicators = new Set([RESOURCE_INDICATOR, options.audience]);

  const resourceServer = {
    scope: RESOURCE_SCOPE,
    audience: options.audience,
    accessTokenTTL: options.tokenTtl,
    accessTokenFormat: options.tokenFormat,
  };
  if (options.tokenFormat === 'jwt') {
    resourceServer.jwt = { sign: { alg: options.alg } };
  }

  const client = {
    client_id: options.clientId,
    client_secret: options.clientSecret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    scope: RESOURCE_SCOPE,
  };
  if (options.signingKeys !== undefined) {
    // oidc-provider checks the client's id_token_signed_response_alg (default
    // RS256) against the algs of the configured keys at the first token
    // request, although this client never gets an ID token. A key file may
    // have no RS256 key, so use the access token alg, which it always has.
    client.id_token_signed_response_alg = options.alg;
  }

  // The resource server (the sidecar) only calls the introspection endpoint.
  // That endpoint authenticates clients by token_endpoint_auth_method and
  // checks no grant type, so this client needs none.
  const introspectionClient = {
    client_id: options.introspectionClientId,
    client_secret: options.introspectionClientSecret,
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  };
  if (options.signingKeys !== undefined) {
    // This client needs it for the same reason as the first one. Without it,
    // a key file with only ES256 keys makes every introspection fail with
    // invalid_client_metadata.
    introspectionClient.id_token_signed_response_alg = options.alg;
  }

  return {
    clients: [client, introspectionClient],
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
      introspection: {
        enabled: true,
        allowedPolicy: createIntrospectionPolicy(options.introspectionClientId),
      },
      revocation: {
        enabled: true,
        allowedPolicy: revocationAllowedPolicy,
      },
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

// Build the features.introspection.allowedPolicy hook. oidc-provider 9.13.3
// calls it in lib/actions/introspection.js with the authenticated client and
// the token it found. On false the response stays {"active": false}, and on
// true it contains the token's details. The default policy lets every
// confidential client introspect every token, so this one allows only the
// resource server client, the caller that RFC 7662 describes.
function createIntrospectionPolicy(introspectionClientId) {
  return async (_ctx, client, token) => {
    if (client.clientId === introspectionClientId) {
      return true;
    }
    log(`introspection request by client ${client.clientId} for a token of client ${token.clientId} returned {"active": false}, because only client ${introspectionClientId} may introspect tokens`);
    return false;
  };
}

// Let only the client that a token was issued to revoke it (RFC 7009, section
// 2.1). oidc-provider 9.13.3 calls this hook in lib/actions/revocation.js
// before it deletes the token, and sends the InvalidRequest thrown here as a
// 400 invalid_request response.
async function revocationAllowedPolicy(_ctx, client, token) {
  if (client.clientId !== token.clientId) {
    throw new errors.InvalidRequest(`client ${client.clientId} may not revoke this token, because it was issued to another client`);
  }
  return true;
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
  provider.on('client_credentials.destroyed', (token) => {
    log(`revoked an access token of client ${token.clientId}`);
  });
  for (const endpoint of ['introspection', 'revocation']) {
    provider.on(`${endpoint}.error`, (ctx, err) => {
      const clientId = ctx.oidc?.client?.clientId ?? '(unknown)';
      log(`${endpoint} request for client_id ${clientId} failed: ${err.message} (${err.error_description ?? 'no description'})`);
    });
  }
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

function logFileSigningKeys(options) {
  const kids = options.signingKeys.map((jwk) => `${jwk.kid} (${jwk.alg})`).join(', ');
  if (options.tokenFormat !== 'jwt') {
    log(`signing keys from ${options.jwksFile}: ${kids}. Access tokens are ${options.tokenFormat}, so no key signs them`);
    return;
  }
  const tokenKid = options.signingKeys.find((jwk) => jwk.alg === options.alg).kid;
  log(`signing keys from ${options.jwksFile}: ${kids}. Access tokens are signed with kid ${JSON.stringify(tokenKid)}`);
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
  log(`listening: issuer ${issuer}, client ${options.clientId}, introspection client ${options.introspectionClientId}, audience ${JSON.stringify(options.audience)}, token format ${options.tokenFormat}, alg ${options.alg}, token TTL ${options.tokenTtl}s`);
  if (options.signingKeys !== undefined) {
    logFileSigningKeys(options);
  }
  process.stdout.write(`READY ${issuer}\n`);
}

main().catch((err) => {
  log(`start-up failed: ${err.stack ?? err}`);
  process.exit(1);
});
