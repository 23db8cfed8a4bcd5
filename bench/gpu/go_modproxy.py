#!/usr/bin/env python3
"""go_modproxy.py MODS: a GOPROXY=file:// tree made from GitHub snapshots.

For the ollama 0.32.15 build without the Go module proxy (build-ollama-032.sh).
MODS has one "module version" a line (the require blocks of go.mod). Each
module's repository must be a git directory under $MIRROR/OWNER+NAME/repo (the
search tool's `fetch`; golang.org/x/NAME is golang/NAME, google.golang.org/protobuf
is protocolbuffers/protobuf-go, gopkg.in/yaml.v3 is go-yaml/yaml, gonum.org/v1/gonum
is gonum/gonum, gorgonia.org/vecf32|64 are gorgonia/vecf32|64). The version is
resolved to a commit (a pseudo-version's hash, else the tag, SUB/vX for a module in
a subfolder), `git archive`d, filtered as the go command filters a module zip, and
written as $PROXY/<module>/@v/<version>.{zip,mod,info}. Each zip's and go.mod's h1:
hash is compared with $GOSUM: "OK" or "BAD ... ZIP-MISMATCH" (a blob missing from
the snapshot, typically test data); $MYSUM gets the hashes of what was written, for
rewriting go.sum where a module had to differ. Adapted from the 0.5.7 build's tools.
"""
import subprocess, os, sys, io, zipfile, hashlib, base64, json, re
M=os.environ.get('MIRROR', '/work/.mirror')
special = {
 'github.com/apache/arrow/go/arrow': ('apache+arrow','go/arrow'),
 'github.com/bytedance/sonic/loader': ('bytedance+sonic','loader'),
 'github.com/ugorji/go/codec': ('ugorji+go','codec'),
 'go4.org/unsafe/assume-no-moving-gc': ('go4org+unsafe-assume-no-moving-gc',''),
 'gonum.org/v1/gonum': ('gonum+gonum',''),
 'google.golang.org/protobuf': ('protocolbuffers+protobuf-go',''),
 'gopkg.in/yaml.v3': ('go-yaml+yaml',''),
 'gorgonia.org/vecf32': ('gorgonia+vecf32',''),
 'gorgonia.org/vecf64': ('gorgonia+vecf64',''),
}
def gitdir(name):
    for c in (f'{M}/{name}/repo/.git', f'{M}/{name}/repo'):
        if os.path.exists(c+'/HEAD'): return c
    raise Exception('no mirror '+name)
def repo_of(mod):
    if mod in special: r,sub=special[mod]
    elif mod.startswith('golang.org/x/'): r,sub='golang+'+mod.split('/')[2],''
    elif mod.startswith('github.com/'):
        p=mod.split('/'); r=p[1]+'+'+p[2]; sub=''
        rest=p[3:]
        if rest and re.fullmatch(r'v\d+',rest[-1]): rest=rest[:-1]
        sub='/'.join(rest)
    else: raise Exception(mod)
    return gitdir(r), sub
def rev(gd, sub, ver):
    v=ver.replace('+incompatible','')
    m=re.search(r'-(?:\d+\.)?\d{14}-([0-9a-f]{12})$', v)
    if m:
        return subprocess.check_output(['git','--git-dir',gd,'rev-parse',m.group(1)+'^{commit}'],text=True).strip()
    tag=(sub+'/' if sub else '')+v
    return subprocess.check_output(['git','--git-dir',gd,'rev-parse','refs/tags/'+tag+'^{commit}'],text=True,stderr=subprocess.DEVNULL).strip()

P=os.environ.get('PROXY', 'proxy')
def esc(s): return re.sub(r'[A-Z]', lambda m:'!'+m.group(0).lower(), s)
def h1(files, prefix=''):  # files: dict name->bytes
    lines=''.join(f'{hashlib.sha256(files[n]).hexdigest()}  {prefix}{n}\n' for n in sorted(files, key=lambda n: prefix+n))
    return 'h1:'+base64.b64encode(hashlib.sha256(lines.encode()).digest()).decode()
def git(gd,*a, **kw): return subprocess.check_output(['git','--git-dir',gd,'-c','core.autocrlf=input','-c','core.eol=lf',*a], **kw)
MISSING=[]
def files_from_tree(gd, commit, sub):
    out={}
    lst=git(gd,'ls-tree','-r','-z',commit, *( [sub] if sub else []))
    for ent in lst.split(b'\0'):
        if not ent: continue
        meta,name=ent.split(b'\t',1); mode,typ,sha=meta.split()
        name=name.decode()
        if typ!=b'blob' or mode==b'120000': continue
        if sub: name=name[len(sub)+1:]
        try: out[name]=subprocess.check_output(['git','--git-dir',gd,'cat-file','blob',sha.decode()],stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError: MISSING.append((gd,commit,name)); print('MISSING BLOB',gd,name)
    return out
def files_from_git(gd, commit, sub):
    try: data=git(gd,'archive','--format=zip',commit, *( [sub] if sub else []), stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError: return files_from_tree(gd, commit, sub)
    z=zipfile.ZipFile(io.BytesIO(data)); out={}
    for info in z.infolist():
        if info.is_dir(): continue
        name=info.filename
        # symlinks: zip external attr
        if (info.external_attr>>16) & 0o170000 == 0o120000: continue
        if sub: 
            assert name.startswith(sub+'/'); name=name[len(sub)+1:]
        out[name]=z.read(info)
    return out
def filter_mod(files):
    # drop nested modules
    nested=set(os.path.dirname(n) for n in files if n.endswith('/go.mod') or n=='go.mod')
    nested.discard('')
    res={}
    for n,b in files.items():
        parts=n.split('/')
        if any(p in ('.git','.hg','.svn','.bzr') for p in parts[:-1]): continue
        d=os.path.dirname(n)
        if any(d==x or d.startswith(x+'/') for x in nested): continue
        # vendored packages
        if 'vendor' in parts[:-1]:
            i=parts.index('vendor')
            if len(parts)-i>2: continue  # vendor/x/file
        res[n]=b
    return res
def write(mod, ver, files, modtext, t):
    d=f'{P}/{esc(mod)}/@v'; os.makedirs(d, exist_ok=True)
    if files is not None:
        buf=io.BytesIO(); z=zipfile.ZipFile(buf,'w',zipfile.ZIP_DEFLATED)
        for n in sorted(files): z.writestr(f'{mod}@{ver}/{n}', files[n])
        z.close(); open(f'{d}/{ver}.zip','wb').write(buf.getvalue())
    open(f'{d}/{ver}.mod','w').write(modtext)
    open(f'{d}/{ver}.info','w').write(json.dumps({'Version':ver,'Time':t}))
    with open(f'{d}/list','a') as f: f.write(ver+'\n')
if __name__=='__main__':
    gosum={}
    for l in open(os.environ.get('GOSUM', 'go.sum')):
        m,v,h=l.split(); gosum[(m,v)]=h
    mysum=[]
    for l in open(sys.argv[1]):
        mod,ver=l.split()
        try:
            gd,sub=repo_of(mod); c=rev(gd,sub,ver)
        except Exception as e:
            print('SKIP',mod,ver,e); continue
        t=git(gd,'log','-1','--format=%cI',c,text=True).strip()
        files=filter_mod(files_from_git(gd,c,sub))
        if sub and 'LICENSE' not in files:
            try: files['LICENSE']=git(gd,'show',f'{c}:LICENSE')
            except subprocess.CalledProcessError: pass
        modtext=files['go.mod'].decode() if 'go.mod' in files else f'module {mod}\n'
        write(mod,ver,files,modtext,t)
        hz=h1(files, f'{mod}@{ver}/'); hm=h1({'go.mod':modtext.encode()})
        okz=gosum.get((mod,ver))==hz; okm=gosum.get((mod,ver+'/go.mod'))==hm
        print(('OK ' if okz and okm else 'BAD'), mod, ver, 'zip' if okz else 'ZIP-MISMATCH', 'mod' if okm else 'MOD-MISMATCH')
        mysum.append(f'{mod} {ver} {hz}\n{mod} {ver}/go.mod {hm}\n')
    open(os.environ.get('MYSUM', 'mysum.txt'),'w').write(''.join(mysum))
